"""Writes ``legacy_checkpoints.pt``: checkpoints in the formats of commit e394a1c (before the
scheduler state became one object), kept so that ``tests/test_scheduler_state.py`` proves they
still load. Run once with that commit's ``celo_hf`` and ``meta_training`` first on ``sys.path`` (the folder
given as the first argument, default: this checkout); the file it wrote is committed."""

import copy
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

sys.path[:0] = [sys.argv[1] if len(sys.argv) > 1 else str(Path(__file__).resolve().parents[2]), str(Path(__file__).resolve().parents[1])]
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
saved = copy.deepcopy(optimizer.state_dict())  # torch's state dict shares the state tensors
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
