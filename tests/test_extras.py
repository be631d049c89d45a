"""The meta_training entry points name the missing [meta] extra and how to install it (no raw import error)."""

from __future__ import annotations

from pathlib import Path

#: Both entry points' ``main`` with scikit-learn hidden (as if not installed); prints each exit message.
WITHOUT_SKLEARN = """
import sys
sys.modules["sklearn"] = None  # any import of sklearn now raises ModuleNotFoundError
from meta_training import evaluate, train
for main in (evaluate.main, train.main):
    try:
        main(["--out", {out!r}])
    except SystemExit as exit:
        print("exit:", exit.code)
"""


def test_entry_points_without_sklearn_say_which_extra_to_install(tmp_path, run_python):
    done = run_python(WITHOUT_SKLEARN.format(out=str(tmp_path / "out")))
    assert done.stdout.splitlines() == [
        f'exit: python -m meta_training.{name} needs scikit-learn, not installed here: install celo_hf\'s [meta] '
        f'extra, pip install -e ".[meta]" (from the repository root)'
        for name in ("evaluate", "train")
    ], done.stdout + done.stderr
    assert not Path(tmp_path / "out").exists()  # nothing ran
