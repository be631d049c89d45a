"""Resolving ``Celo(weights=...)`` to a ``CeloNet``: a module as is, the embedded default, a path or a Hub id.

Above :mod:`celo_hf.network`; the formats and the downloading are :mod:`celo_hf.weight_files`.
Writing is ``CeloNet.save_pretrained`` / ``push_to_hub``. :func:`load_meta_model` is the code path
every update rule's resolver shares (Celo2's: :func:`celo_hf.celo2.hub.load_celo2_net`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TypeVar

from .meta_model import MetaModel
from .network import CeloNet
from .weight_files import CONFIG_FILE, PAPER_FILE, WEIGHTS_FILE, CeloWeightsError

__all__ = ["DEFAULT_WEIGHTS_DIR", "CeloWeightsError", "load_celo_net", "load_meta_model"]

#: Folder inside the package holding the embedded default weights (this project's format).
DEFAULT_WEIGHTS_DIR = Path(__file__).with_name("default_weights")

_Model = TypeVar("_Model", bound=MetaModel)


def load_meta_model(
    net_class: type[_Model],
    default_dir: Path,
    weights: _Model | str | Path | None,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool = False,
    force_download: bool = False,
) -> _Model:
    """Resolve ``weights`` to a ``net_class``: an instance as is, ``None`` for the embedded default in
    ``default_dir`` (this project's format), else a path or Hub id through ``net_class.from_pretrained``."""
    if isinstance(weights, net_class):
        return weights
    if weights is None:
        if (default_dir / WEIGHTS_FILE).is_file():
            return net_class.from_pretrained(default_dir)
        examples = " or ".join(repr(repo) for repo in net_class.update_rule.hub_examples)
        raise CeloWeightsError(
            f"celo_hf has no embedded default weights for {net_class.update_rule.title}: {default_dir} holds no "
            f"{WEIGHTS_FILE}. "
            f"Pass weights= a local {PAPER_FILE} file or a folder with {CONFIG_FILE} + {WEIGHTS_FILE}, or a Hub "
            f"model id such as {examples}."
        )
    if not isinstance(weights, (str, os.PathLike)):
        raise TypeError(
            f"weights must be a {net_class.__name__}, a path, a Hub model id or None, got {type(weights).__name__}"
        )
    return net_class.from_pretrained(
        weights,
        revision=revision,
        token=token,
        cache_dir=cache_dir,
        local_files_only=local_files_only,
        force_download=force_download,
    )


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
    weights embedded in this package. Celo2 weights are refused.
    """
    return load_meta_model(
        CeloNet,
        DEFAULT_WEIGHTS_DIR,
        weights,
        revision=revision,
        token=token,
        cache_dir=cache_dir,
        local_files_only=local_files_only,
        force_download=force_download,
    )
