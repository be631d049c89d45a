"""Loading Celo's weights from local files and folders: the paper's ``theta.state``, this project's
``config.json`` + ``model.safetensors``, a ``CeloNet`` object; the errors for every kind of bad input
(each names the file and what is wrong); and that nothing is ever unpickled. (Hub model ids are
tested against the loopback Hub in ``test_hub_weights.py``.)"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import msgpack
import numpy as np
import pytest
import torch
from helpers import PAPER_WEIGHTS
from safetensors.torch import load_file, save_file

from celo_hf import Celo, CeloNet, CeloWeightsError, hub, load_celo_net


def _assert_same_weights(a: CeloNet, b: CeloNet) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


def _trajectory(weights: CeloNet | str | Path, steps: int = 4) -> list[torch.Tensor]:
    """Parameters after each of a few Celo steps with ``weights``."""
    generator = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=generator)) for s in [(3, 5), (5,), ()]]
    optimizer = Celo(params, total_steps=steps, weights=weights)
    out = []
    for t in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator)
        optimizer.step(loss=2.0 - 0.1 * t)
        out.append(torch.cat([p.detach().reshape(-1) for p in params]))
    return out


@pytest.fixture
def own_folder(tmp_path) -> Path:
    """A folder in this project's format, written by ``save_pretrained`` from a random CeloNet with a
    non-default configuration."""
    torch.manual_seed(0)
    net = CeloNet(mlp_hidden_size=6, lstm_hidden_size=16, momentum_decays=(0.5, 0.9), factored_decays=(0.8, 0.95))
    folder = tmp_path / "own"
    net.save_pretrained(folder)
    return folder


def _message(error: pytest.ExceptionInfo, *parts: str | Path) -> None:
    """The error message names each of ``parts`` (paths as given)."""
    for part in parts:
        assert str(part) in str(error.value), (str(part), str(error.value))


# ---- what loads -------------------------------------------------------------------------------------


def test_paper_checkpoint_by_file_and_by_folder(tmp_path, paper_net):
    folder = tmp_path / "paper"
    folder.mkdir()
    shutil.copy(PAPER_WEIGHTS, folder / "theta.state")
    for source in (PAPER_WEIGHTS, str(PAPER_WEIGHTS), folder, str(folder)):
        _assert_same_weights(load_celo_net(source), paper_net)
        _assert_same_weights(CeloNet.from_pretrained(source), paper_net)
    _assert_same_weights(Celo([torch.nn.Parameter(torch.zeros(2))], weights=folder).net, paper_net)
    # The learned initial LSTM state is read (it is non-zero in the paper's weights).
    assert paper_net.init_hidden.abs().sum() > 0 and paper_net.init_cell.abs().sum() > 0


def test_own_format_round_trip_is_exact(own_folder, paper_net, tmp_path):
    assert {"config.json", "model.safetensors"} <= {p.name for p in own_folder.iterdir()}
    torch.manual_seed(0)
    original = CeloNet(mlp_hidden_size=6, lstm_hidden_size=16, momentum_decays=(0.5, 0.9), factored_decays=(0.8, 0.95))
    loaded = CeloNet.from_pretrained(own_folder)
    _assert_same_weights(loaded, original)
    assert loaded.momentum_decays == (0.5, 0.9) and loaded.factored_decays == (0.8, 0.95)
    assert loaded.lstm.hidden_size == 16 and loaded.mlp[0].out_features == 6
    _assert_same_weights(load_celo_net(own_folder / "model.safetensors"), original)  # the weights file itself

    # The paper's weights survive conversion to this project's format bit for bit, and the optimizer
    # follows the same trajectory with either.
    paper_net.save_pretrained(tmp_path / "converted")
    converted = CeloNet.from_pretrained(tmp_path / "converted")
    _assert_same_weights(converted, paper_net)
    for a, b in zip(_trajectory(tmp_path / "converted"), _trajectory(PAPER_WEIGHTS)):
        assert torch.equal(a, b)


def test_celo_accepts_a_celonet_instance(paper_net):
    params = [torch.nn.Parameter(torch.zeros(3))]
    assert Celo(params, weights=paper_net).net is paper_net
    for a, b in zip(_trajectory(paper_net), _trajectory(PAPER_WEIGHTS)):
        assert torch.equal(a, b)


def test_no_weights_names_the_alternatives(monkeypatch, tmp_path):
    monkeypatch.setattr(hub, "DEFAULT_WEIGHTS_DIR", tmp_path / "no_default_weights")
    with pytest.raises(CeloWeightsError, match="no embedded default weights") as error:
        Celo([torch.nn.Parameter(torch.zeros(3))], total_steps=5)
    _message(error, "theta.state", "config.json + model.safetensors", "Hub model id", "amoudgl/celo")


def test_weights_of_the_wrong_type_are_named():
    with pytest.raises(TypeError, match="weights must be a CeloNet, a path, a Hub model id or None, got dict"):
        load_celo_net({"mlp.0.weight": torch.zeros(1)})


# ---- the paper's format: bad files ---------------------------------------------------------------------


def _raw_tree() -> dict:
    """The paper checkpoint as nested dicts with its array extension records kept opaque."""
    return msgpack.unpackb(PAPER_WEIGHTS.read_bytes(), ext_hook=msgpack.ExtType, raw=False, strict_map_key=False)


def _write(path: Path, tree: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(msgpack.packb(tree, use_bin_type=True))
    return path


def _flax_array(array: np.ndarray) -> msgpack.ExtType:
    """A numpy array as flax serialises it (msgpack extension 1: shape, dtype name, raw bytes)."""
    return msgpack.ExtType(1, msgpack.packb([list(array.shape), array.dtype.name, array.tobytes()], use_bin_type=True))


def test_missing_file_is_named(tmp_path):
    missing = tmp_path / "nowhere" / "theta.state"
    with pytest.raises(CeloWeightsError, match="neither an existing file or folder nor a Hub model id") as error:
        load_celo_net(missing)
    _message(error, missing)


@pytest.mark.reference
def test_truncated_paper_checkpoint(tmp_path):
    path = tmp_path / "theta.state"
    path.write_bytes(PAPER_WEIGHTS.read_bytes()[: 149216 // 2])
    with pytest.raises(CeloWeightsError, match="is not a readable flax msgpack checkpoint") as error:
        load_celo_net(path)
    _message(error, path)


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"\xc1\xc1 not msgpack at all", "is not a readable flax msgpack checkpoint"),
        (msgpack.packb([1.0, 2.0, 3.0]), "holds a msgpack list, expected a map of meta-parameters"),
        (msgpack.packb({"weights": 1}), "has no leaf lstm_init_state/hidden: not a Celo checkpoint"),
    ],
    ids=["garbage", "not-a-map", "foreign-map"],
)
def test_garbage_paper_checkpoint(tmp_path, content, problem):
    path = tmp_path / "theta.state"
    path.write_bytes(content)
    with pytest.raises(CeloWeightsError, match=re.escape(problem)) as error:
        load_celo_net(path)
    _message(error, path)


@pytest.mark.reference
def test_paper_checkpoint_with_a_missing_leaf(tmp_path):
    tree = _raw_tree()
    del tree["ff_mod_stack"]["~"]["w0__13"]
    path = _write(tmp_path / "theta.state", tree)
    with pytest.raises(CeloWeightsError, match="has no leaf ff_mod_stack/~/w0__13") as error:
        load_celo_net(path)
    _message(error, path)


@pytest.mark.parametrize(
    ("keys", "value", "problem"),
    [
        (
            ("rnn_params", "rnn/linear", "w"),
            _flax_array(np.zeros((128, 255), np.float32)),
            "has shape (128, 255), expected (128, 256)",
        ),
        (
            ("ff_mod_stack", "~", "w1"),
            _flax_array(np.zeros((4, 4), np.float32)),
            "has shape (4, 4), expected (1, 4, 4)",
        ),
        (("rnn_params", "step_size", "b"), [0.5], "has shape list, expected (1,)"),
    ],
    ids=["lstm-weight", "mlp-weight", "not-an-array"],
)
@pytest.mark.reference
def test_paper_checkpoint_with_a_wrong_leaf(tmp_path, keys, value, problem):
    tree = _raw_tree()
    node = tree
    for key in keys[:-1]:
        node = node[key]
    node[keys[-1]] = value
    path = _write(tmp_path / "theta.state", tree)
    with pytest.raises(CeloWeightsError, match=re.escape(problem)) as error:
        load_celo_net(path)
    _message(error, path, "/".join(keys))


def test_paper_checkpoint_rewritten_unchanged_still_loads(tmp_path, paper_net):
    """Guard for the tests above: re-packing the untouched tree gives a loadable checkpoint."""
    _assert_same_weights(load_celo_net(_write(tmp_path / "theta.state", _raw_tree())), paper_net)


# ---- this project's format: bad folders -----------------------------------------------------------------


def test_folder_without_weights(tmp_path):
    (tmp_path / "README.md").write_text("no weights here")
    problem = "holds neither config.json + model.safetensors (celo_hf format) nor theta.state (paper format)"
    with pytest.raises(CeloWeightsError, match=re.escape(problem)) as error:
        load_celo_net(tmp_path)
    _message(error, tmp_path)


@pytest.mark.parametrize(
    ("config", "problem"),
    [
        ('{"mlp_hidden_size": 6,', "is not a readable JSON config"),
        ("[4, 6]", "holds a list, expected a JSON object"),
        ('{"mlp_hidden_size": 6, "hidden_sise": 3}', "has settings CeloNet does not take"),
        ('{"momentum_decays": [0.9], "factored_decays": [0.9, 0.99]}', "must have the same length"),
    ],
    ids=["invalid-json", "not-an-object", "unknown-key", "inconsistent"],
)
def test_bad_config(own_folder, config, problem):
    (own_folder / "config.json").write_text(config)
    with pytest.raises(CeloWeightsError, match=re.escape(problem)) as error:
        load_celo_net(own_folder)
    _message(error, own_folder / "config.json")


def test_config_without_weights_file(own_folder):
    (own_folder / "model.safetensors").unlink()
    with pytest.raises(CeloWeightsError, match="is not a readable safetensors file") as error:
        load_celo_net(own_folder)
    _message(error, own_folder / "model.safetensors")


def test_weights_without_config_file(own_folder):
    (own_folder / "config.json").unlink()
    with pytest.raises(CeloWeightsError, match="is not a readable JSON config") as error:
        load_celo_net(own_folder)
    _message(error, own_folder / "config.json")


def test_truncated_safetensors(own_folder):
    weights = own_folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(CeloWeightsError, match="is not a readable safetensors file") as error:
        load_celo_net(own_folder)
    _message(error, weights)


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (lambda state: state.pop("lr_head.bias"), "missing ['lr_head.bias']"),
        (lambda state: state.update(extra=torch.zeros(2)), "unexpected ['extra']"),
        (
            lambda state: state.update({"mlp.0.weight": torch.zeros(6, 20)}),
            "wrong shape [('mlp.0.weight', (6, 20), (6, 22))]",  # 22 input features with 2 decays
        ),
    ],
    ids=["missing-key", "unexpected-key", "wrong-shape"],
)
def test_safetensors_not_matching_the_config(own_folder, edit, problem):
    weights = own_folder / "model.safetensors"
    state = load_file(str(weights))
    edit(state)
    save_file(state, str(weights))
    with pytest.raises(CeloWeightsError, match=re.escape(problem)) as error:
        load_celo_net(own_folder)
    _message(error, weights, own_folder / "config.json")


# ---- nothing is unpickled ------------------------------------------------------------------------------


class _Tripwire:
    """Unpickling this creates the folder ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


@pytest.mark.parametrize("layout", ["pickle-only", "config-and-pickle", "pickle-named-theta.state"])
def test_pickles_are_never_loaded(tmp_path, own_folder, layout):
    marker = tmp_path / "unpickled"
    payload = {"mlp.0.weight": _Tripwire(marker)}
    if layout == "pickle-only":
        folder = tmp_path / "pickle_only"
        folder.mkdir()
        torch.save(payload, folder / "pytorch_model.bin")
        source, problem = folder, "holds neither"
    elif layout == "config-and-pickle":
        (own_folder / "model.safetensors").unlink()
        torch.save(payload, own_folder / "pytorch_model.bin")
        source, problem = own_folder, "model.safetensors is not a readable safetensors file"
    else:
        source = tmp_path / "theta.state"
        torch.save(payload, source)
        problem = "is not a readable flax msgpack checkpoint"
    with pytest.raises(CeloWeightsError, match=re.escape(problem)):
        load_celo_net(source)
    assert not marker.exists(), "a pickle was loaded"
    # Guard: the tripwire does fire when unpickled.
    torch.load(next(tmp_path.rglob("pytorch_model.bin"), source), weights_only=False)
    assert marker.is_dir()

