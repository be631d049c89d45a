"""Shared pytest fixtures for celo_hf."""

# =====================================================================================================================
# Hugging Face Hub loopback server (tests/hub_server.py)
#
# huggingface_hub reads HF_ENDPOINT, HF_HOME, HF_HUB_OFFLINE, ... when it is *imported*, so this block runs at
# conftest import time, before any test module (or celo_hf) imports huggingface_hub/transformers: it starts ONE
# session-wide LoopbackHub on 127.0.0.1 and points the whole test session (and every subprocess it starts, which
# inherits os.environ) at it, with a fresh temporary HF_HOME so that no test reads or writes ~/.cache.
# Fixtures: `hub` (session), `hf_cache` (fresh cache dir per test), `run_python` (subprocess helper).
# =====================================================================================================================
import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hub_server import LoopbackHub, run_python as _run_python  # noqa: E402

if "huggingface_hub" in sys.modules:  # too late: its constants already point at the real Hub / ~/.cache
    raise RuntimeError("huggingface_hub was imported before tests/conftest.py could set HF_ENDPOINT/HF_HOME")

_HUB = LoopbackHub()
_HF_HOME = tempfile.mkdtemp(prefix="celo_hf_test_hf_home_")
# backend="cpp" builds its kernels into a fresh cache too (a few seconds per configuration), not ~/.cache.
_KERNEL_CACHE = os.environ["CELO_HF_KERNEL_CACHE"] = tempfile.mkdtemp(prefix="celo_hf_test_kernels_")
# meta_training's AdamW-pretrained inner models too (meta_training/finetune.py; about 2 s each).
_PRETRAINED = os.environ["CELO_HF_META_PRETRAINED"] = tempfile.mkdtemp(prefix="celo_hf_test_pretrained_")
for _var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_ASSETS_CACHE", "HUGGINGFACE_ASSETS_CACHE", "HF_XET_CACHE",
             "HF_TOKEN_PATH", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE",
             "HUGGINGFACE_CO_STAGING", "HF_HUB_DISABLE_IMPLICIT_TOKEN", "HF_DATASETS_CACHE", "TRANSFORMERS_CACHE"):
    os.environ.pop(_var, None)
os.environ.update(
    HF_ENDPOINT=_HUB.url,
    HF_HOME=_HF_HOME,
    HF_TOKEN=_HUB.token,
    HF_HUB_DISABLE_TELEMETRY="1",
    HF_HUB_DISABLE_PROGRESS_BARS="1",
    HF_HUB_DISABLE_UPDATE_CHECK="1",
    NO_PROXY=",".join(filter(None, [os.environ.get("NO_PROXY"), "127.0.0.1,localhost"])),
)
os.environ["no_proxy"] = os.environ["NO_PROXY"]


@atexit.register
def _stop_hub() -> None:
    _HUB.close()
    shutil.rmtree(_HF_HOME, ignore_errors=True)
    shutil.rmtree(_KERNEL_CACHE, ignore_errors=True)
    shutil.rmtree(_PRETRAINED, ignore_errors=True)


@pytest.fixture(scope="session")
def hub() -> LoopbackHub:
    """The session-wide loopback Hub (``hub.url`` == ``os.environ["HF_ENDPOINT"]``). Repos persist across tests:
    use repo ids unique to your test (e.g. ``f"test/{request.node.name}"``) or ``hub.add_files`` new commits."""
    return _HUB


@pytest.fixture
def hf_cache(tmp_path) -> str:
    """A fresh, empty Hub cache directory for this test; pass it as ``cache_dir=`` to huggingface_hub functions
    (the session default cache is ``$HF_HOME/hub``, shared by all tests)."""
    path = tmp_path / "hf_cache"
    path.mkdir()
    return str(path)


@pytest.fixture
def run_python():
    """``run_python(code, env=None, timeout=120) -> CompletedProcess``: run ``code`` in a fresh interpreter that
    inherits the loopback-Hub environment; ``env`` overrides variables (``None`` removes one), e.g.
    ``run_python(code, {"HF_HUB_OFFLINE": "1"})``. Raises AssertionError (with stdout/stderr) on non-zero exit."""
    return _run_python


# ================================================== end of Hub section ===============================================


@pytest.fixture(autouse=True)
def one_thread():
    """Every test runs torch on one thread: on small tensors two threads only add contention (on a
    busy 2-core machine 100 small steps took 15 s with 2 threads, 2 s with 1)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


#: The tests/scripts/ runs that take two processes, all in one torchrun launch (tests/scripts/several.py).
TWO_PROCESS_RUNS = ("fsdp_equivalence", "ddp_trainer", "plain_loops", "fsdp_trainer", "celo2_distributed")


@pytest.fixture(scope="session")
def two_process_runs(tmp_path_factory):
    """Every run of :data:`TWO_PROCESS_RUNS` in ONE torchrun launch of 2 gloo processes (each launch
    costs about 15 s of CPU in imports alone): the folder holding each one's outputs in ``<name>/``.
    They run Celo with the reference folder's checkpoints. Under pytest-xdist (the README's ``-n 2``)
    the launch runs once for the whole session: the first worker that needs it runs it in the
    session's shared temporary folder, under a file lock; the others wait and read its outputs."""
    from filelock import FileLock
    from helpers import TWO_PROCESSES, require_reference, run_script

    require_reference()
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        out_dir = tmp_path_factory.mktemp("two_processes")
    else:  # each worker's base folder lies in the session's
        out_dir = tmp_path_factory.getbasetemp().parent / "two_processes"
    with FileLock(f"{out_dir}.lock"):
        done = out_dir / "done"
        if not done.exists():
            out_dir.mkdir(exist_ok=True)
            run_script(Path(__file__).parent / "scripts" / "several.py", TWO_PROCESSES, out_dir, *TWO_PROCESS_RUNS)
            done.touch()
    return out_dir


# ====================================== reference data (tests/helpers.py REFERENCE) ==================================
# Tests that read the shared reference folder (the paper's checkpoint, the golden vectors) are marked
# `@pytest.mark.reference` or take the `paper_net` fixture: without the folder they are skipped with a reason
# naming what is missing, and under CI=true they fail (helpers.require_reference).


def pytest_configure(config) -> None:
    config.addinivalue_line(
        "markers", "reference: reads the shared reference folder (helpers.REFERENCE, $CELO_HF_REFERENCE): skipped "
        "without it, an error under CI=true"
    )


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item) -> None:
    if item.get_closest_marker("reference") is not None:
        from helpers import require_reference

        require_reference()


@pytest.fixture(scope="module")
def paper_net():
    """The paper's released Celo (``helpers.PAPER_WEIGHTS``) as a ``CeloNet``, loaded once per module."""
    from helpers import PAPER_WEIGHTS, require_reference

    from celo_hf.hub import load_celo_net

    require_reference()
    return load_celo_net(PAPER_WEIGHTS)
