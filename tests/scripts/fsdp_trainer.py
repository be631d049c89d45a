"""Train a tiny Llama with Celo through CeloTrainer under FSDP2, or as one plain process; save what it saw.

    torchrun --standalone --nproc_per_node 2 tests/scripts/fsdp_trainer.py OUT_DIR   # FSDP2, 2 x 2 examples
    python tests/scripts/fsdp_trainer.py OUT_DIR                                     # no FSDP, 1 x 4 examples

FSDP2 on CPU: Accelerate's FSDP plugin (``TrainingArguments(fsdp=True, fsdp_config={"version": 2})``
or ``accelerate launch --use_fsdp --fsdp_version 2``) is silently dropped on CPU by accelerate 1.15
(it enables FSDP only for GPU-like distributed types, never MULTI_CPU), so Trainer would run plain
data parallelism. The model is therefore sharded by transformers itself at load time,
``from_pretrained(..., distributed_config=DistributedConfig(fsdp_size=2))`` (``fully_shard`` per
its FSDP plan, gloo), which Trainer then trains as is. Celo comes through the package's FSDP route,
``optimizer_cls_and_kwargs=(celo_hf.CeloFactory, {...})``: Trainer builds it over the sharded model.
The script asserts that two processes ran and that every parameter Celo updates is a ``Shard(0)``
DTensor on a 2-rank mesh, some of them split between the ranks.

Writes ``OUT_DIR/rank{r}.pt``: the losses fed to Celo, the losses Trainer logged, Celo's iteration
count, the final full parameters by name (float64), and which parameters ``CeloFactory`` marks fresh
on the same model loaded, sharded the same way, as a sequence classifier (:func:`fresh_marked`).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from torch.distributed.tensor import DTensor, Shard
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, TrainerCallback
from transformers.distributed import DistributedConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trainer_setup import (  # noqa: E402
    PAPER_WEIGHTS,
    collate,
    logged_losses,
    process_group,
    ragged_examples,
    script_setup,
    tiny_model,
    training_args,
)

import celo_hf  # noqa: E402
from celo_hf.trainer import find_celo  # noqa: E402

KIND = "llama"  # has an FSDP plan (transformers shards it at load time)
ACCUMULATION = 2
#: Examples per micro-batch over all processes (the per-device batch is this / world size).
GLOBAL_BATCH = 4


class Inspect(TrainerCallback):
    """Records every loss handed to Celo (its ``set_loss``, wrapped on the instance) and checks,
    at every optimizer step, which kind of parameters Celo updates."""

    def __init__(self, sharded: bool) -> None:
        self.sharded = sharded
        self.fed: list[float] = []
        self.split = 0  # parameters whose rows are spread over both ranks

    def on_train_begin(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> None:
        celo = find_celo(optimizer)
        assert celo is not None, f"Trainer's optimizer is {type(optimizer).__name__}, not Celo"
        set_loss = celo.set_loss

        def recording_set_loss(loss: Any) -> None:
            self.fed.append(float(loss))
            set_loss(loss)

        celo.set_loss = recording_set_loss  # type: ignore[method-assign]

    def on_optimizer_step(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> None:
        celo = find_celo(optimizer)
        params = [p for group in celo.param_groups for p in group["params"]]
        assert params and all(p in celo.state for p in params), "Celo did not update every parameter"
        if not self.sharded:
            assert not any(isinstance(p, DTensor) for p in params)
            return
        for p in params:
            assert isinstance(p, DTensor), f"FSDP2 did not shard a parameter of shape {tuple(p.shape)}"
            assert tuple(p.placements) == (Shard(0),) and p.device_mesh.size() == 2, (p.placements, p.device_mesh)
        self.split = sum(0 < p.to_local().shape[0] < p.shape[0] for p in params)
        assert self.split > 0, "no parameter is split between the two ranks"


def full_parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter by name, whole (DTensors gathered from all ranks), in float64."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
    return {
        name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().double().clone()
        for name, p in model.named_parameters()
    }


def fresh_marked(model_dir: Path, distributed: dict[str, Any]) -> dict[str, bool]:
    """The saved LM loaded as a 3-way sequence classifier (its ``score`` head new), sharded as the
    LM was, and Celo built over it by Trainer's FSDP route (``CeloFactory``): the names of the
    parameters in Celo's ``"fresh"`` param groups, each with whether it is a DTensor."""
    classifier = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=3, dtype=torch.float32,
                                                                    **distributed)
    celo = celo_hf.CeloFactory()(classifier, total_steps=1, weights=PAPER_WEIGHTS)
    fresh = {id(p) for group in celo.param_groups if group.get("fresh") for p in group["params"]}
    return {name: isinstance(p, DTensor) for name, p in classifier.named_parameters() if id(p) in fresh}


def run(out_dir: Path, world_size: int) -> None:
    """The tiny Llama sharded over ``world_size`` (2) processes, or unsharded in one; into ``out_dir``."""
    sharded = world_size == 2
    # The seeded model is saved (by rank 0) and loaded back by every process, sharded when there are two.
    model_dir = out_dir / "model"
    tiny_model(KIND).save_pretrained(model_dir)
    if sharded:
        torch.distributed.barrier()
    distributed = {"distributed_config": DistributedConfig(fsdp_size=2)} if sharded else {}
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **distributed)
    inspect = Inspect(sharded)
    trainer = celo_hf.CeloTrainer(
        model,
        training_args(out_dir / "trainer", per_device_train_batch_size=GLOBAL_BATCH // world_size,
                      gradient_accumulation_steps=ACCUMULATION, lr_scheduler_type="constant"),
        train_dataset=ragged_examples(KIND),
        data_collator=collate,
        optimizer_cls_and_kwargs=(celo_hf.CeloFactory, {"weights": PAPER_WEIGHTS}),
        callbacks=[inspect],
    )
    if trainer.args.world_size != world_size:
        raise SystemExit(f"launched {world_size} processes, but Trainer runs {trainer.args.world_size}")
    if trainer.is_distributed_loading_by_transformers != sharded:
        raise SystemExit(f"expected FSDP2 {'on' if sharded else 'off'}, Trainer has "
                         f"is_distributed_loading_by_transformers={trainer.is_distributed_loading_by_transformers}")
    trainer.train()
    celo = find_celo(trainer.optimizer)
    result = {
        "world_size": world_size,
        "fed": inspect.fed,
        "logged": logged_losses(trainer),
        "iteration": celo.iteration,
        "split": inspect.split,
        "params": full_parameters(trainer.model),
        "fresh": fresh_marked(model_dir, distributed),
    }
    torch.save(result, out_dir / f"rank{trainer.args.process_index}.pt")


def main() -> None:
    out_dir, world_size = script_setup()
    with process_group(world_size):
        run(out_dir, world_size)


if __name__ == "__main__":
    main()
