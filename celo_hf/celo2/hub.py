"""Resolving Celo2's ``weights=...`` to a ``Celo2Net``: a module as is, the embedded default, a path or
a Hub id (the same code path as Celo's, :func:`celo_hf.hub.load_meta_model`).

Formats and downloading: :mod:`celo_hf.weight_files`. Writing: ``Celo2Net.save_pretrained`` /
``push_to_hub``.
"""

from __future__ import annotations

from pathlib import Path

from ..hub import load_meta_model
from .network import Celo2Net

__all__ = ["DEFAULT_CELO2_WEIGHTS_DIR", "load_celo2_net"]

#: Folder inside the package for Celo2's embedded default weights (this project's format, with a
#: model card); meta-training is to produce them.
DEFAULT_CELO2_WEIGHTS_DIR = Path(__file__).parents[1] / "default_weights_celo2"


def load_celo2_net(
    weights: Celo2Net | str | Path | None,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool = False,
    force_download: bool = False,
) -> Celo2Net:
    """Resolve ``weights`` to a ``Celo2Net``.

    ``weights`` may be a ``Celo2Net`` (used as is), a local file or folder in either format, a Hub
    model id in either format (e.g. ``"amoudgl/celo2"``, ``"amoudgl/celo2-base"``; downloaded through
    ``huggingface_hub``'s cache; ``revision``, ``token``, ``cache_dir``, ``local_files_only`` and
    ``HF_HUB_OFFLINE`` apply), or ``None`` for the weights embedded in this package
    (:data:`DEFAULT_CELO2_WEIGHTS_DIR`). Celo (v1) weights are refused.
    """
    return load_meta_model(
        Celo2Net,
        DEFAULT_CELO2_WEIGHTS_DIR,
        weights,
        revision=revision,
        token=token,
        cache_dir=cache_dir,
        local_files_only=local_files_only,
        force_download=force_download,
    )
