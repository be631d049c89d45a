"""Resolving ``Celo(weights=...)`` to a ``CeloNet``: a module as is, the embedded default, a path or a Hub id.

Above :mod:`celo_hf.network`; the formats and the downloading are :mod:`celo_hf.weight_files`.
Writing is ``CeloNet.save_pretrained`` / ``push_to_hub``.
"""

from __future__ import annotations

import os
from pathlib import Path

from .network import CeloNet
from .weight_files import WEIGHTS_FILE, CeloWeightsError

__all__ = ["DEFAULT_WEIGHTS_DIR", "CeloWeightsError", "load_celo_net"]

#: Folder inside the package holding the embedded default weights (this project's format).
DEFAULT_WEIGHTS_DIR = Path(__file__).with_name("default_weights")


def load_celo_net(
    weights: CeloNet | str | Path | None,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool = False,
    force_download: bool = False,
) -> CeloNet:
    """Resolve ``weights`` to a ``CeloNet``.

    ``weights`` may be a ``CeloNet`` (used as is), a local file or folder in either format, a Hub
    model id in either format (downloaded through ``huggingface_hub``'s cache; ``revision``,
    ``token``, ``cache_dir``, ``local_files_only`` and ``HF_HUB_OFFLINE`` apply), or ``None`` for the
    weights embedded in this package.
    """
    if isinstance(weights, CeloNet):
        return weights
    if weights is None:
        if (DEFAULT_WEIGHTS_DIR / WEIGHTS_FILE).is_file():
            return CeloNet.from_pretrained(DEFAULT_WEIGHTS_DIR)
        raise CeloWeightsError(
            "celo_hf has no embedded default weights yet (they come from meta_training/). Pass weights= "
            "a local theta.state file or a folder with config.json + model.safetensors, or a Hub model "
            "id such as 'amoudgl/celo'."
        )
    if not isinstance(weights, (str, os.PathLike)):
        raise TypeError(f"weights must be a CeloNet, a path, a Hub model id or None, got {type(weights).__name__}")
    return CeloNet.from_pretrained(
        weights,
        revision=revision,
        token=token,
        cache_dir=cache_dir,
        local_files_only=local_files_only,
        force_download=force_download,
    )
