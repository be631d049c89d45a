"""Reading Celo weights: the paper's flax checkpoint and this project's format, locally or from the Hub.

Below :mod:`celo_hf.network`: the readers return a :class:`WeightFiles` (the ``CeloNet``
configuration and state dict, and where they came from); ``CeloNet.from_pretrained`` builds the
module from it. Two formats are understood, locally or by Hub model id:

* **this project's**: a folder (or Hub repo) with ``config.json`` (``CeloNet``'s hyper-parameters)
  and ``model.safetensors``; written by ``CeloNet.save_pretrained`` / ``push_to_hub``;
* **the paper's**: ``theta.state``, the flax msgpack serialisation of the JAX meta-parameter tree,
  decoded here with ``msgpack`` and ``numpy`` only (``docs/celo-algorithm.md`` §10).

Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import msgpack
import numpy as np
import torch
from huggingface_hub import constants, get_hf_file_metadata, hf_hub_download, hf_hub_url
from huggingface_hub.errors import (
    EntryNotFoundError,
    FileMetadataError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from safetensors import SafetensorError
from safetensors.torch import load_file

from .layout import feature_group_widths

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
PAPER_FILE = "theta.state"

_FLAX_NDARRAY_EXT = 1
_FLAX_NPSCALAR_EXT = 3
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class CeloWeightsError(ValueError):
    """A Celo checkpoint could not be found or read; the message names the file or id and why."""


class WeightFiles(NamedTuple):
    """What a checkpoint holds: ``config`` (``CeloNet``'s keyword arguments; ``{}``: its defaults,
    the paper's Celo) and ``state`` (a ``CeloNet`` state dict, float32), and the files they were
    read from (``config_source``, ``state_source``; the same file for the paper's format)."""

    config: dict[str, Any]
    state: dict[str, torch.Tensor]
    config_source: str
    state_source: str


# ---- the paper's flax msgpack checkpoint ---------------------------------------------------------


def _decode_flax_ext(code: int, payload: bytes) -> np.ndarray:
    if code not in (_FLAX_NDARRAY_EXT, _FLAX_NPSCALAR_EXT):
        raise ValueError(f"unsupported msgpack extension type {code} (expected 1 = ndarray or 3 = numpy scalar)")
    shape, dtype, buffer = msgpack.unpackb(payload, raw=False)
    dtype = dtype.decode() if isinstance(dtype, bytes) else dtype
    return np.frombuffer(buffer, dtype=np.dtype(dtype)).reshape(shape)


def read_flax_msgpack(path: str | Path) -> dict[str, Any]:
    """Decode a flax ``serialization.to_bytes`` file into nested dicts of numpy arrays."""
    path = Path(path)
    try:
        tree = msgpack.unpackb(path.read_bytes(), ext_hook=_decode_flax_ext, raw=False, strict_map_key=False)
    except (ValueError, TypeError, msgpack.UnpackException) as err:
        raise CeloWeightsError(f"{path} is not a readable flax msgpack checkpoint: {err}") from err
    if not isinstance(tree, dict):
        raise CeloWeightsError(f"{path} holds a msgpack {type(tree).__name__}, expected a map of meta-parameters")
    return tree


def _leaf(tree: Mapping[str, Any], path: str, keys: tuple[str, ...], shape: tuple[int, ...]) -> torch.Tensor:
    node: Any = tree
    for key in keys:
        if not isinstance(node, Mapping) or key not in node:
            raise CeloWeightsError(f"{path} has no leaf {'/'.join(keys)}: not a Celo checkpoint")
        node = node[key]
    if not isinstance(node, np.ndarray) or node.shape != shape:
        got = node.shape if isinstance(node, np.ndarray) else type(node).__name__
        raise CeloWeightsError(f"{path}: leaf {'/'.join(keys)} has shape {got}, expected {shape}")
    return torch.from_numpy(node.astype(np.float32, copy=True))


def _reorder_haiku_gates(blocks: torch.Tensor, hidden: int) -> torch.Tensor:
    """Haiku's LSTM gate blocks are ``[i | g | f | o]`` along the last axis; PyTorch's ``[i | f | g | o]``."""
    i, g, f, o = blocks.split(hidden, dim=-1)
    return torch.cat([i, f, g, o], dim=-1)


#: Momentum decays of the paper's Celo (``CeloNet``'s default), which fix its feature groups' widths.
_PAPER_NUM_DECAYS = 3


def read_paper_checkpoint(path: str | Path) -> WeightFiles:
    """The released Celo (``docs/celo-algorithm.md`` §6, §8, §10) from ``theta.state``: ``CeloNet``'s
    default configuration and the state dict, its LSTM gates reordered to PyTorch's.

    The scheduler's dead ``linear`` layer and the ``rnn_to_controls`` head (no effect with a single
    MLP) are not kept.
    """
    tree = read_flax_msgpack(path)
    hidden = _leaf(tree, str(path), ("lstm_init_state", "hidden"), (1, 64)).shape[1]
    mlp = ("ff_mod_stack", "~")
    widths = feature_group_widths(_PAPER_NUM_DECAYS)
    w0 = torch.cat([_leaf(tree, str(path), (*mlp, f"w0__{i}"), (1, k, 4))[0] for i, k in enumerate(widths)])
    rnn = lambda name, key, shape: _leaf(tree, str(path), ("rnn_params", name, key), shape)  # noqa: E731
    lstm_w = rnn("rnn/linear", "w", (2 * hidden, 4 * hidden))
    lstm_b = _reorder_haiku_gates(rnn("rnn/linear", "b", (4 * hidden,)), hidden)
    lstm_b[hidden : 2 * hidden] += 1.0  # haiku adds +1 to the forget gate at run time
    state = {
        "mlp.0.weight": w0.T,
        "mlp.0.bias": _leaf(tree, str(path), (*mlp, "b0"), (1, 4))[0],
        "mlp.2.weight": _leaf(tree, str(path), (*mlp, "w1"), (1, 4, 4))[0].T,
        "mlp.2.bias": _leaf(tree, str(path), (*mlp, "b1"), (1, 4))[0],
        "mlp.4.weight": _leaf(tree, str(path), (*mlp, "w2"), (1, 4, 3))[0].T,
        "mlp.4.bias": _leaf(tree, str(path), (*mlp, "b2"), (1, 3))[0],
        "pool_proj.weight": rnn("linear_1", "w", (18, hidden)).T,
        "pool_proj.bias": rnn("linear_1", "b", (hidden,)),
        "input_proj.weight": rnn("linear_2", "w", (18, hidden)).T,
        "input_proj.bias": rnn("linear_2", "b", (hidden,)),
        "lstm.weight_ih": _reorder_haiku_gates(lstm_w[:hidden], hidden).T,
        "lstm.weight_hh": _reorder_haiku_gates(lstm_w[hidden:], hidden).T,
        "lstm.bias_ih": lstm_b,
        "lstm.bias_hh": torch.zeros(4 * hidden),
        "lr_head.weight": rnn("step_size", "w", (hidden, 1)).T,
        "lr_head.bias": rnn("step_size", "b", (1,)),
        "init_hidden": _leaf(tree, str(path), ("lstm_init_state", "hidden"), (1, hidden)),
        "init_cell": _leaf(tree, str(path), ("lstm_init_state", "cell"), (1, hidden)),
    }
    return WeightFiles({}, {k: v.contiguous() for k, v in state.items()}, str(path), str(path))


# ---- this project's format -----------------------------------------------------------------------


def read_folder_files(config_path: str | Path, weights_path: str | Path) -> WeightFiles:
    """``config.json`` (a JSON object) and ``model.safetensors`` (as float32)."""
    try:
        config = json.loads(Path(config_path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CeloWeightsError(f"{config_path} is not a readable JSON config: {err}") from err
    if not isinstance(config, dict):
        raise CeloWeightsError(f"{config_path} holds a {type(config).__name__}, expected a JSON object")
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError) as err:
        raise CeloWeightsError(f"{weights_path} is not a readable safetensors file: {err}") from err
    return WeightFiles(config, {k: v.float() for k, v in state.items()}, str(config_path), str(weights_path))


# ---- resolution: path or Hub id ------------------------------------------------------------------


def read_local(path: Path) -> WeightFiles:
    """The weights in a local file or folder, in either format."""
    if path.is_file():
        if path.name == WEIGHTS_FILE:
            return read_folder_files(path.with_name(CONFIG_FILE), path)
        return read_paper_checkpoint(path)
    if (path / CONFIG_FILE).is_file() or (path / WEIGHTS_FILE).is_file():
        return read_folder_files(path / CONFIG_FILE, path / WEIGHTS_FILE)
    if (path / PAPER_FILE).is_file():
        return read_paper_checkpoint(path / PAPER_FILE)
    raise CeloWeightsError(
        f"folder {path} holds neither {CONFIG_FILE} + {WEIGHTS_FILE} (celo_hf format) nor {PAPER_FILE} (paper format)"
    )


def _unreachable_hub(repo_id: str, revision: str | None, token: str | bool | None) -> Exception | None:
    """One quick look-up (a HEAD of ``config.json``, no retries, ``HF_HUB_ETAG_TIMEOUT`` seconds at most):
    ``None`` when the Hub answers (whatever the answer), else the error that came instead (connection
    refused, unknown host, timeout, a 5xx status). ``hf_hub_download`` would retry such errors with backoff
    (about 25 s per file) before falling back to the cache."""
    try:
        get_hf_file_metadata(
            hf_hub_url(repo_id, CONFIG_FILE, revision=revision), token=token, timeout=constants.HF_HUB_ETAG_TIMEOUT
        )
    except HfHubHTTPError as err:  # the Hub answered with an HTTP error status
        return err if err.response.status_code >= 500 else None
    except (EntryNotFoundError, FileMetadataError):  # the Hub answered
        return None
    except Exception as err:  # noqa: BLE001 -- no answer: the HTTP client's transport error, whatever its class
        return err
    return None


def _why_not_downloadable(
    repo_id: str, revision: str | None, token: str | bool | None, local_files_only: bool
) -> str | None:
    """Why files of ``repo_id`` cannot come from the Hub now (an offline setting, or the Hub not answering
    one quick look-up), or ``None`` when they can."""
    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE=1 forbids downloading it"
    if local_files_only:
        return "local_files_only=True forbids downloading it"
    error = _unreachable_hub(repo_id, revision, token)
    if error is None:
        return None
    return f"the Hub at {constants.ENDPOINT} cannot be reached ({type(error).__name__}: {error})"


def _read_from_hub(repo_id: str, **download: Any) -> WeightFiles:
    where = f"Hub model {repo_id!r} (revision {download.get('revision') or 'main'})"
    offline = _why_not_downloadable(repo_id, download["revision"], download["token"], download["local_files_only"])
    if offline is not None:
        if download["force_download"]:
            raise CeloWeightsError(f"{where} cannot be downloaded again (force_download=True): {offline}")
        download = download | {"local_files_only": True}  # only the cache can serve it: no retries, no waiting

    def fetch(filename: str) -> str:
        return hf_hub_download(repo_id, filename, **download)

    try:
        try:
            config_path = fetch(CONFIG_FILE)
        except EntryNotFoundError as no_config:  # no config.json, or (LocalEntryNotFoundError) none in the cache
            try:
                return read_paper_checkpoint(fetch(PAPER_FILE))
            except LocalEntryNotFoundError:
                raise
            except EntryNotFoundError:
                raise CeloWeightsError(
                    f"{where} has neither {CONFIG_FILE} + {WEIGHTS_FILE} nor {PAPER_FILE}"
                ) from no_config
        return read_folder_files(config_path, fetch(WEIGHTS_FILE))
    except LocalEntryNotFoundError as err:
        download_once = (
            "unset HF_HUB_OFFLINE to download it once" if constants.HF_HUB_OFFLINE else
            "download it once with network access (HF_HUB_OFFLINE=1 then loads it from the cache, trying no Hub)"
        )
        raise CeloWeightsError(
            f"{where} is not in the local cache and {offline or 'the Hub cannot be reached'}: {download_once}, or "
            f"pass weights= a local path (a {PAPER_FILE} file, or a folder with {CONFIG_FILE} + {WEIGHTS_FILE})"
        ) from err
    except RepositoryNotFoundError as err:
        raise CeloWeightsError(
            f"Hub model {repo_id!r} was not found (or is private and no valid token was given)"
        ) from err
    except RevisionNotFoundError as err:
        raise CeloWeightsError(f"Hub model {repo_id!r} has no revision {download.get('revision')!r}") from err
    except EntryNotFoundError as err:
        raise CeloWeightsError(f"Hub model {repo_id!r} has {CONFIG_FILE} but not {WEIGHTS_FILE}") from err
    except (OfflineModeIsEnabled, HfHubHTTPError) as err:
        raise CeloWeightsError(f"could not fetch Hub model {repo_id!r}: {err}") from err


def read_weights(
    weights: str | os.PathLike[str],
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool = False,
    force_download: bool = False,
) -> WeightFiles:
    """The weights in a local file or folder in either format, or a Hub model id in either format
    (downloaded through ``huggingface_hub``'s cache; ``revision``, ``token``, ``cache_dir``,
    ``local_files_only`` and ``HF_HUB_OFFLINE`` apply)."""
    path = Path(weights).expanduser()
    if path.exists():
        return read_local(path)
    if not _REPO_ID.match(str(weights)) or str(weights).count("/") > 1:
        raise CeloWeightsError(f"weights {str(weights)!r} is neither an existing file or folder nor a Hub model id")
    return _read_from_hub(
        str(weights),
        revision=revision,
        token=token,
        cache_dir=cache_dir,
        local_files_only=local_files_only,
        force_download=force_download,
    )
