"""Reading the weights of Celo and Celo2: the papers' flax checkpoints and this project's format,
locally or from the Hub.

Below :mod:`celo_hf.meta_model`: the readers return a :class:`WeightFiles` (a meta-model's
configuration and state dict, and where they came from); ``CeloNet.from_pretrained`` /
``Celo2Net.from_pretrained`` build the module from it. Every reader serves one
:class:`UpdateRule` (:data:`CELO` or :data:`CELO2`) and refuses the other's weights. Two formats are
understood, locally or by Hub model id:

* **this project's**: a folder (or Hub repo) with ``config.json`` (the meta-model's hyper-parameters,
  and ``update_rule``: ``"celo"`` or ``"celo2"``; folders written before Celo2 existed lack it and are
  Celo's) and ``model.safetensors``; written by ``save_pretrained`` / ``push_to_hub``;
* **the papers'**: ``theta.state``, the flax msgpack serialisation of the JAX meta-parameter tree,
  decoded here with ``msgpack`` and ``numpy`` only (Celo: ``docs/celo-algorithm.md`` §10; Celo2:
  ``docs/celo2-algorithm.md`` §14). Both rules name the file ``theta.state``; the tree
  tells them apart (Celo's has the scheduler's ``rnn_params`` / ``lstm_init_state`` and a leading
  stack axis of 1 on its MLP leaves, Celo2's only the MLP, without that axis).

Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
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
#: The key of ``config.json`` that names the update rule the weights are for (absent: Celo).
UPDATE_RULE_KEY = "update_rule"

_FLAX_NDARRAY_EXT = 1
_FLAX_NPSCALAR_EXT = 3
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class CeloWeightsError(ValueError):
    """A Celo checkpoint could not be found or read; the message names the file or id and why."""


class WeightFiles(NamedTuple):
    """What a checkpoint holds: ``config`` (the meta-model's keyword arguments, without
    ``update_rule``; ``{}``: its defaults, the paper's configuration) and ``state`` (the meta-model's
    state dict, float32), and the files they were read from (``config_source``, ``state_source``; the
    same file for the paper's format)."""

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


def _leaf(
    tree: Mapping[str, Any],
    path: str,
    keys: tuple[str, ...],
    shape: tuple[int, ...],
    *,
    kind: str = "Celo",
    only_float32: bool = False,
) -> torch.Tensor:
    """The array at ``keys`` as float32, checked to have ``shape`` (and to be stored as float32 if
    ``only_float32``; otherwise any dtype is cast); ``kind`` names the expected checkpoint in errors."""
    node: Any = tree
    for key in keys:
        if not isinstance(node, Mapping) or key not in node:
            raise CeloWeightsError(f"{path} has no leaf {'/'.join(keys)}: not a {kind} checkpoint")
        node = node[key]
    if not isinstance(node, np.ndarray) or node.shape != shape:
        got = node.shape if isinstance(node, np.ndarray) else type(node).__name__
        raise CeloWeightsError(f"{path}: leaf {'/'.join(keys)} has shape {got}, expected {shape}")
    if only_float32 and node.dtype != np.float32:
        raise CeloWeightsError(f"{path}: leaf {'/'.join(keys)} has dtype {node.dtype}, expected float32")
    return torch.from_numpy(node.astype(np.float32, copy=True))


def _leaf_paths(node: Any, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """The key path of every leaf (anything but a map) of a decoded msgpack tree."""
    if not isinstance(node, Mapping):
        yield prefix
        return
    for key, child in node.items():
        yield from _leaf_paths(child, (*prefix, str(key)))


#: Where both papers' trees keep the per-parameter MLP.
_MLP_KEYS = ("ff_mod_stack", "~")


def _paper_rule(tree: Mapping[str, Any]) -> UpdateRule | None:
    """Which update rule a paper-format tree is for, by its structure (``None``: neither's). Celo's
    has the scheduler (``rnn_params``, ``lstm_init_state``) and a leading stack axis of 1 on the MLP
    leaves (``w1`` is ``(1, 4, 4)``); Celo2's has only the MLP, without that axis (``w1`` is 2-D)."""
    if "rnn_params" in tree or "lstm_init_state" in tree:
        return CELO
    node: Any = tree
    for key in (*_MLP_KEYS, "w1"):
        node = node.get(key) if isinstance(node, Mapping) else None
    if isinstance(node, np.ndarray) and node.ndim == 3 and node.shape[0] == 1:
        return CELO
    if isinstance(node, np.ndarray) and node.ndim == 2:
        return CELO2
    return None


def _refuse_other_rule(tree: Mapping[str, Any], path: str, rule: UpdateRule) -> None:
    """Raise if the tree at ``path`` is recognisably the paper checkpoint of an update rule other than ``rule``."""
    found = _paper_rule(tree)
    if found is not None and found is not rule:
        raise CeloWeightsError(
            f"{path} is a {found.title} checkpoint ({found.paper_signature}), not a {rule.title} one: "
            f"load it with {found.loader}"
        )


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
    _refuse_other_rule(tree, str(path), CELO)
    hidden = _leaf(tree, str(path), ("lstm_init_state", "hidden"), (1, 64)).shape[1]
    mlp = _MLP_KEYS
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


#: Width of the released Celo2's MLP hidden layers (``docs/celo2-algorithm.md`` §1).
_CELO2_PAPER_HIDDEN = 8


def _celo2_paper_shapes() -> dict[str, tuple[int, ...]]:
    """Each leaf of the released Celo2's ``ff_mod_stack/~`` and its shape, weights ``(in, out)``:
    ``w0__i`` has one row per input of feature group ``i`` (``docs/celo2-algorithm.md`` §14)."""
    hidden = _CELO2_PAPER_HIDDEN
    first = {f"w0__{i}": (width, hidden) for i, width in enumerate(feature_group_widths(_PAPER_NUM_DECAYS))}
    return {"b0": (hidden,), "b1": (hidden,), "b2": (3,), **first, "w1": (hidden, hidden), "w2": (hidden, 3)}


def read_celo2_paper_checkpoint(path: str | Path) -> WeightFiles:
    """The released Celo2 / Celo2-base (same tree; ``docs/celo2-algorithm.md`` §9, §14) from ``theta.state``:
    ``Celo2Net``'s default configuration and its state dict.

    The file must hold exactly the 19 float32 leaves of :func:`_celo2_paper_shapes` under
    ``ff_mod_stack/~`` (looked up by name: their stored order is not numeric). ``w0__0 .. w0__13`` are
    stacked in numeric order into the ``(30, 8)`` first layer; every ``(in, out)`` weight is
    transposed to ``torch.nn.Linear``'s ``(out, in)``.
    """
    tree = read_flax_msgpack(path)
    _refuse_other_rule(tree, str(path), CELO2)
    shapes = _celo2_paper_shapes()
    expected = {(*_MLP_KEYS, name) for name in shapes}
    unexpected = sorted("/".join(keys) for keys in set(_leaf_paths(tree)) - expected)
    if unexpected:
        raise CeloWeightsError(
            f"{path} has leaves a Celo2 checkpoint does not: {unexpected} (expected exactly the "
            f"{len(shapes)} leaves {'/'.join(_MLP_KEYS)}/{{{', '.join(shapes)}}})"
        )
    leaf = {
        name: _leaf(tree, str(path), (*_MLP_KEYS, name), shape, kind="Celo2", only_float32=True)
        for name, shape in shapes.items()
    }
    w0 = torch.cat([leaf[f"w0__{i}"] for i in range(len(feature_group_widths(_PAPER_NUM_DECAYS)))])
    state = {
        "mlp.0.weight": w0.T,
        "mlp.0.bias": leaf["b0"],
        "mlp.2.weight": leaf["w1"].T,
        "mlp.2.bias": leaf["b1"],
        "mlp.4.weight": leaf["w2"].T,
        "mlp.4.bias": leaf["b2"],
    }
    return WeightFiles({}, {k: v.contiguous() for k, v in state.items()}, str(path), str(path))


# ---- the update rules ----------------------------------------------------------------------------


@dataclass(frozen=True)
class UpdateRule:
    """One update rule as checkpoint I/O sees it.

    Attributes:
        name: its ``config.json`` ``update_rule`` value.
        title: its name in messages.
        loader: what loads its weights, for messages.
        hub_examples: Hub model ids of its released weights, for messages.
        paper_signature: what marks its paper checkpoint, for messages.
        read_paper: the reader of its paper checkpoint (``theta.state``).
    """

    name: str
    title: str
    loader: str
    hub_examples: tuple[str, ...]
    paper_signature: str
    read_paper: Callable[[str | Path], WeightFiles]


CELO = UpdateRule(
    name="celo",
    title="Celo (v1)",
    loader="celo_hf.Celo / celo_hf.CeloNet",
    hub_examples=("amoudgl/celo",),
    paper_signature="it has the scheduler's rnn_params / lstm_init_state and MLP leaves with a stack axis of 1",
    read_paper=read_paper_checkpoint,
)
CELO2 = UpdateRule(
    name="celo2",
    title="Celo2",
    loader="the Celo2 optimizer of celo_hf.celo2 / celo_hf.celo2.network.Celo2Net",
    hub_examples=("amoudgl/celo2", "amoudgl/celo2-base"),
    paper_signature="it has only the MLP ff_mod_stack/~, without a stack axis or a scheduler",
    read_paper=read_celo2_paper_checkpoint,
)
#: Every update rule by its ``config.json`` name.
UPDATE_RULES = {rule.name: rule for rule in (CELO, CELO2)}


# ---- this project's format -----------------------------------------------------------------------


def read_folder_files(config_path: str | Path, weights_path: str | Path, rule: UpdateRule) -> WeightFiles:
    """``config.json`` (a JSON object, for ``rule``) and ``model.safetensors`` (as float32)."""
    try:
        config = json.loads(Path(config_path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CeloWeightsError(f"{config_path} is not a readable JSON config: {err}") from err
    if not isinstance(config, dict):
        raise CeloWeightsError(f"{config_path} holds a {type(config).__name__}, expected a JSON object")
    why = f"{UPDATE_RULE_KEY} {config.get(UPDATE_RULE_KEY)!r}" if UPDATE_RULE_KEY in config else (
        f"no {UPDATE_RULE_KEY}: written before Celo2 existed")
    written_for = config.pop(UPDATE_RULE_KEY, CELO.name)
    if written_for not in UPDATE_RULES:
        raise CeloWeightsError(f"{config_path}: {why} is not one of {sorted(UPDATE_RULES)}")
    if written_for != rule.name:
        found = UPDATE_RULES[written_for]
        raise CeloWeightsError(
            f"{config_path} is for {found.title} ({why}), not {rule.title}: load it with {found.loader}"
        )
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError) as err:
        raise CeloWeightsError(f"{weights_path} is not a readable safetensors file: {err}") from err
    return WeightFiles(config, {k: v.float() for k, v in state.items()}, str(config_path), str(weights_path))


# ---- resolution: path or Hub id ------------------------------------------------------------------


def read_local(path: Path, rule: UpdateRule) -> WeightFiles:
    """``rule``'s weights in a local file or folder, in either format."""
    if path.is_file():
        if path.name == WEIGHTS_FILE:
            return read_folder_files(path.with_name(CONFIG_FILE), path, rule)
        return rule.read_paper(path)
    if (path / CONFIG_FILE).is_file() or (path / WEIGHTS_FILE).is_file():
        return read_folder_files(path / CONFIG_FILE, path / WEIGHTS_FILE, rule)
    if (path / PAPER_FILE).is_file():
        return rule.read_paper(path / PAPER_FILE)
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


def _read_from_hub(repo_id: str, rule: UpdateRule, **download: Any) -> WeightFiles:
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
                return rule.read_paper(fetch(PAPER_FILE))
            except LocalEntryNotFoundError:
                raise
            except EntryNotFoundError:
                raise CeloWeightsError(
                    f"{where} has neither {CONFIG_FILE} + {WEIGHTS_FILE} nor {PAPER_FILE}"
                ) from no_config
        return read_folder_files(config_path, fetch(WEIGHTS_FILE), rule)
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
    rule: UpdateRule,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool = False,
    force_download: bool = False,
) -> WeightFiles:
    """``rule``'s weights in a local file or folder in either format, or a Hub model id in either
    format (downloaded through ``huggingface_hub``'s cache; ``revision``, ``token``, ``cache_dir``,
    ``local_files_only`` and ``HF_HUB_OFFLINE`` apply). Weights of another rule are refused."""
    path = Path(weights).expanduser()
    if path.exists():
        return read_local(path, rule)
    if not _REPO_ID.match(str(weights)) or str(weights).count("/") > 1:
        raise CeloWeightsError(f"weights {str(weights)!r} is neither an existing file or folder nor a Hub model id")
    return _read_from_hub(
        str(weights),
        rule,
        revision=revision,
        token=token,
        cache_dir=cache_dir,
        local_files_only=local_files_only,
        force_download=force_download,
    )
