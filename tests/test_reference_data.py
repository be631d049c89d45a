"""Without the shared reference folder, the tests that read it are skipped with a reason naming what is
missing; under ``CI=true`` they fail instead. Checked by running real test files in a fresh pytest whose
``CELO_HF_REFERENCE`` points at a folder that does not exist."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: One test of each kind: golden vectors read at collection (a whole module), marked tests (of Celo and of
#: Celo2), a test taking the ``paper_net`` fixture, and a test that does not need the reference.
SELECTION = (
    "tests/test_golden.py",
    "tests/test_weights.py::test_truncated_paper_checkpoint",
    "tests/test_celo2_weights.py::test_rewritten_unchanged_still_loads",
    "tests/test_hub_weights.py::test_private_repo_needs_the_token",
    "tests/test_weights.py::test_missing_file_is_named",
)


def _pytest_without_reference(tmp_path: Path, ci: bool) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["CELO_HF_REFERENCE"] = str(tmp_path / "no-reference")
    if ci:
        env["CI"] = "true"
    command = [sys.executable, "-m", "pytest", "-q", "-rsE", "-p", "no:cacheprovider", "--continue-on-collection-errors",
               *SELECTION]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_missing_reference_skips_with_a_reason_naming_what_is_missing(tmp_path):
    done = _pytest_without_reference(tmp_path, ci=False)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "1 passed" in output and "error" not in output.lower(), output
    skips = [line for line in output.splitlines() if line.startswith("SKIPPED")]
    assert sum(int(line.split("[")[1].split("]")[0]) for line in skips) >= 3, output  # module + marker + fixture
    for line in skips:
        assert str(tmp_path / "no-reference" / "celo_theta.state") in line, line
        assert "celo_golden.npz" in line and "CELO_HF_REFERENCE" in line, line
        assert str(tmp_path / "no-reference" / "celo2" / "theta_random.state") in line, line


@pytest.mark.slow
def test_missing_reference_is_an_error_under_ci(tmp_path):
    done = _pytest_without_reference(tmp_path, ci=True)
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert "1 passed" in output and "skipped" not in output, output
    assert "ERROR tests/test_golden.py" in output, output  # at collection
    assert "ERROR tests/test_weights.py::test_truncated_paper_checkpoint" in output, output  # the marker
    assert "ERROR tests/test_celo2_weights.py::test_rewritten_unchanged_still_loads" in output, output
    assert "ERROR tests/test_hub_weights.py::test_private_repo_needs_the_token" in output, output  # the fixture
    assert output.count(f"reference data not found: {tmp_path / 'no-reference' / 'celo_theta.state'}") >= 3, output
    assert "CI=true" in output, output
