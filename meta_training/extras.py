"""The optional dependencies of meta_training (the package's ``[meta]`` extra), checked at its entry points
so that a missing one is named with the command that installs it, not met later as a raw import error."""

from __future__ import annotations

import importlib

#: Module imported somewhere in meta_training -> the distribution that provides it (in the ``[meta]`` extra).
META_MODULES = {"sklearn": "scikit-learn", "matplotlib": "matplotlib"}
INSTALL_META = 'pip install -e ".[meta]"'


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def require_meta_extra(entry_point: str) -> None:
    """Exit (status 1) with a message naming what is missing and how to install it, unless every module of
    ``META_MODULES`` imports; ``entry_point`` is the command being run, e.g. ``"meta_training.train"``."""
    missing = [distribution for module, distribution in META_MODULES.items() if not _importable(module)]
    if missing:
        raise SystemExit(
            f"{entry_point} needs {' and '.join(missing)}, not installed here: install celo_hf's [meta] extra, "
            f"{INSTALL_META} (from the repository root)"
        )
