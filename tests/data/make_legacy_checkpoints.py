"""Writes ``legacy_checkpoints.pt``: checkpoints in the formats of commit e394a1c (before the
scheduler state became one object), kept so that ``tests/test_scheduler_state.py`` proves they
still load. Run once at that commit from the repository root:
``python tests/data/make_legacy_checkpoints.py``; the file it wrote is committed."""

import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[2])]
from optimizer_setup import make_params, run_steps  # noqa: E402
from test_meta_training import TINY  # noqa: E402

from celo_hf import Celo, CeloNet  # noqa: E402
from meta_training.tasks import families_by_name  # noqa: E402
from meta_training.train import run  # noqa: E402

torch.manual_seed(0)
net = CeloNet(lstm_hidden_size=8)
params = make_params()
optimizer = Celo(params, total_steps=10, weights=net, backend="eager")
run_steps(optimizer, params, range(3))
saved = optimizer.state_dict()
run_steps(optimizer, params, range(3, 5))
with tempfile.TemporaryDirectory() as folder:
    run(replace(TINY, iterations=2), families_by_name(TINY.families), Path(folder))
    meta = torch.load(Path(folder) / "checkpoint-rank0.pt", weights_only=True)
torch.save(
    {
        "net": net.state_dict(),
        "optimizer_after_3_steps": saved,
        "params_after_5_steps": [p.detach().clone() for p in params],
        "meta_training_after_2_iterations": meta,
    },
    Path(__file__).with_name("legacy_checkpoints.pt"),
)
