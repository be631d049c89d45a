"""Celo2's weights: ``Celo2Net``, the reader of the original's ``theta.state``, this project's format, the
Hub by id (loopback server), the resolver ``load_celo2_net``, and the refusal of Celo (v1) weights (and
of Celo2 weights by Celo)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import msgpack
import numpy as np
import pytest
import torch
from helpers import CELO2_TEST_WEIGHTS, PAPER_WEIGHTS

from celo_hf import CeloNet, CeloWeightsError, load_celo_net
from celo_hf.celo2 import hub as celo2_hub
from celo_hf.celo2.hub import load_celo2_net
from celo_hf.celo2.network import Celo2Net
from celo_hf.hub import DEFAULT_WEIGHTS_DIR

#: The 14 first-layer blocks ``w0__i`` in numeric order, and the number of inputs each has (celo2 spec §14).
FIRST_LAYER_ROWS = (1, 1, 1, 3, 1, 3, 1, 3, 1, 3, 3, 3, 3, 3)


def _decode_independently(path: Path) -> dict[str, np.ndarray]:
    """The leaves under ``ff_mod_stack/~`` of a flax msgpack file, decoded with msgpack and numpy alone."""

    def ext_hook(code: int, payload: bytes) -> np.ndarray:
        assert code == 1, code
        shape, dtype, raw = msgpack.unpackb(payload, raw=False)
        return np.frombuffer(raw, dtype=dtype.decode() if isinstance(dtype, bytes) else dtype).reshape(shape)

    tree = msgpack.unpackb(path.read_bytes(), ext_hook=ext_hook, raw=False, strict_map_key=False)
    return tree["ff_mod_stack"]["~"]


def _expected_state(leaves: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Where §14 puts each leaf in ``Celo2Net``'s state dict: ``(in, out)`` weights transposed, ``w0__i``
    stacked in numeric order."""
    first = np.concatenate([leaves[f"w0__{i}"] for i in range(len(FIRST_LAYER_ROWS))])
    arrays = {"mlp.0.weight": first.T, "mlp.0.bias": leaves["b0"], "mlp.2.weight": leaves["w1"].T,
              "mlp.2.bias": leaves["b1"], "mlp.4.weight": leaves["w2"].T, "mlp.4.bias": leaves["b2"]}
    return {key: torch.from_numpy(np.array(value)) for key, value in arrays.items()}


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype == torch.float32 and torch.equal(sa[key], sb[key]), key


def _message(error: pytest.ExceptionInfo, *parts: str | Path) -> None:
    """The error message names each of ``parts`` (paths as given)."""
    for part in parts:
        assert str(part) in str(error.value), (str(part), str(error.value))


@pytest.fixture(scope="module")
def test_net() -> Celo2Net:
    """The Celo2 test checkpoint (random values) as a ``Celo2Net``."""
    return Celo2Net.from_pretrained(CELO2_TEST_WEIGHTS)


@pytest.fixture
def own_folder(tmp_path) -> Path:
    """A folder in this project's format, written by ``save_pretrained`` from a random Celo2Net with a
    non-default configuration."""
    torch.manual_seed(0)
    net = Celo2Net(mlp_hidden_size=5, mlp_hidden_layers=3, momentum_decays=(0.5, 0.9), factored_decays=(0.8, 0.95))
    net.save_pretrained(tmp_path / "own")
    return tmp_path / "own"


# ---- the module ------------------------------------------------------------------------------------------


def test_celo2net_layout_and_initialisation():
    torch.manual_seed(0)
    net = Celo2Net()
    assert net.momentum_decays == net.factored_decays == (0.9, 0.99, 0.999) and net.rms_decay == 0.95
    assert net.group_widths == FIRST_LAYER_ROWS and net.num_features == 30
    assert [(tuple(w.shape), tuple(b.shape)) for w, b in net.mlp_layers()] == [((8, 30), (8,)), ((8, 8), (8,)),
                                                                              ((3, 8), (3,))]
    assert sum(p.numel() for p in net.parameters()) == 347
    assert net(torch.randn(4, 5, 30)).shape == (4, 5, 3)
    for weight, bias in net.mlp_layers():  # truncated normal, std 1/sqrt(fan_in) before the cut at 2 std
        std = weight.shape[1] ** -0.5
        assert torch.all(bias == 0) and weight.abs().max() <= 2 * std
    first = net.mlp_layers()[0][0]
    assert 0.75 < first.std().item() * 30**0.5 < 1.0  # 0.88 for a normal cut at 2 std (measured 0.878)

    deeper = Celo2Net(mlp_hidden_size=6, mlp_hidden_layers=1, momentum_decays=(0.5, 0.9), factored_decays=(0.8, 0.9))
    assert [tuple(w.shape) for w, _ in deeper.mlp_layers()] == [(6, 22), (3, 6)] and deeper.num_features == 22
    with pytest.raises(ValueError, match="must have the same length"):
        Celo2Net(momentum_decays=(0.9,), factored_decays=(0.9, 0.99))
    with pytest.raises(ValueError, match="mlp_hidden_layers must be >= 1, got 0"):
        Celo2Net(mlp_hidden_layers=0)


# ---- the original's theta.state --------------------------------------------------------------------------


@pytest.mark.reference
def test_every_number_of_the_test_checkpoint_lands_where_the_spec_says(test_net):
    leaves = _decode_independently(CELO2_TEST_WEIGHTS)
    assert sum(leaf.size for leaf in leaves.values()) == 347 and len(leaves) == 19
    expected = _expected_state(leaves)
    state = test_net.state_dict()
    assert state.keys() == expected.keys()
    for key, value in expected.items():
        assert state[key].dtype == torch.float32 and torch.equal(state[key], value), key
    # Guard: stacking w0__i in the stored (string) order would put other numbers in the first layer.
    string_order = np.concatenate([leaves[name] for name in sorted(leaves) if name.startswith("w0__")])
    assert not torch.equal(state["mlp.0.weight"], torch.from_numpy(string_order.T.copy()))
    assert not test_net.training


@pytest.mark.reference
def test_test_checkpoint_by_file_folder_and_resolver(tmp_path, test_net):
    folder = tmp_path / "paper"
    folder.mkdir()
    shutil.copy(CELO2_TEST_WEIGHTS, folder / "theta.state")
    for source in (CELO2_TEST_WEIGHTS, str(CELO2_TEST_WEIGHTS), folder, str(folder)):
        _assert_same_weights(Celo2Net.from_pretrained(source), test_net)
        _assert_same_weights(load_celo2_net(source), test_net)
    assert load_celo2_net(test_net) is test_net


@pytest.mark.reference
@pytest.mark.parametrize("repo", ["amoudgl/celo2", "amoudgl/celo2-base"])
def test_test_checkpoint_by_hub_id(hub, hf_cache, test_net, repo):
    hub.add_files(repo, {"theta.state": CELO2_TEST_WEIGHTS.read_bytes()})
    _assert_same_weights(Celo2Net.from_pretrained(repo, cache_dir=hf_cache), test_net)
    _assert_same_weights(load_celo2_net(repo, cache_dir=hf_cache), test_net)


def _raw_tree() -> dict:
    """The test checkpoint as nested dicts with its array extension records kept opaque."""
    return msgpack.unpackb(CELO2_TEST_WEIGHTS.read_bytes(), ext_hook=msgpack.ExtType, raw=False, strict_map_key=False)


def _write(path: Path, tree: object) -> Path:
    path.write_bytes(msgpack.packb(tree, use_bin_type=True))
    return path


def _flax_array(array: np.ndarray) -> msgpack.ExtType:
    """A numpy array as flax serialises it (msgpack extension 1: shape, dtype name, raw bytes)."""
    return msgpack.ExtType(1, msgpack.packb([list(array.shape), array.dtype.name, array.tobytes()], use_bin_type=True))


@pytest.mark.reference
def test_rewritten_unchanged_still_loads(tmp_path, test_net):
    """Guard for the tests of bad files below: re-packing the untouched tree gives a loadable checkpoint."""
    _assert_same_weights(Celo2Net.from_pretrained(_write(tmp_path / "theta.state", _raw_tree())), test_net)


@pytest.mark.reference
@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        (lambda data: data[: len(data) // 2], "is not a readable flax msgpack checkpoint"),
        (lambda data: b"\xc1" + data[1:], "is not a readable flax msgpack checkpoint"),
    ],
    ids=["truncated", "corrupted"],
)
def test_damaged_file_names_the_file(tmp_path, damage, problem):
    path = tmp_path / "theta.state"
    path.write_bytes(damage(CELO2_TEST_WEIGHTS.read_bytes()))
    with pytest.raises(CeloWeightsError, match=re.escape(problem)) as error:
        Celo2Net.from_pretrained(path)
    _message(error, path)


@pytest.mark.reference
@pytest.mark.parametrize(
    ("leaf", "value", "problem"),
    [
        ("w0__13", None, "has no leaf ff_mod_stack/~/w0__13: not a Celo2 checkpoint"),
        ("w1", _flax_array(np.zeros((8, 7), np.float32)), "leaf ff_mod_stack/~/w1 has shape (8, 7), expected (8, 8)"),
        ("w0__3", _flax_array(np.zeros((1, 8), np.float32)),
         "leaf ff_mod_stack/~/w0__3 has shape (1, 8), expected (3, 8)"),
        ("b2", _flax_array(np.zeros(3, np.float64)), "leaf ff_mod_stack/~/b2 has dtype float64, expected float32"),
        ("w3", _flax_array(np.zeros((3, 3), np.float32)),
         "has leaves a Celo2 checkpoint does not: ['ff_mod_stack/~/w3'] (expected exactly the 19 leaves"),
    ],
    ids=["missing-leaf", "wrong-shape", "wrong-group-width", "float64", "extra-leaf"],
)
def test_bad_leaf_names_the_file_and_the_leaf(tmp_path, leaf, value, problem):
    tree = _raw_tree()
    if value is None:
        del tree["ff_mod_stack"]["~"][leaf]
    else:
        tree["ff_mod_stack"]["~"][leaf] = value
    path = _write(tmp_path / "theta.state", tree)
    with pytest.raises(CeloWeightsError, match=re.escape(problem)) as error:
        Celo2Net.from_pretrained(path)
    _message(error, path)


# ---- this project's format -------------------------------------------------------------------------------


def test_round_trip_is_exact_and_records_the_rule(own_folder):
    torch.manual_seed(0)
    original = Celo2Net(mlp_hidden_size=5, mlp_hidden_layers=3, momentum_decays=(0.5, 0.9), factored_decays=(0.8, 0.95))
    assert {"config.json", "model.safetensors", "README.md"} <= {p.name for p in own_folder.iterdir()}
    assert json.loads((own_folder / "config.json").read_text()) == {
        "mlp_hidden_size": 5, "mlp_hidden_layers": 3, "momentum_decays": [0.5, 0.9], "rms_decay": 0.95,
        "factored_decays": [0.8, 0.95], "update_rule": "celo2",
    }
    assert "# Celo2 meta-model" in (own_folder / "README.md").read_text()
    for source in (own_folder, own_folder / "model.safetensors"):
        loaded = load_celo2_net(source)
        _assert_same_weights(loaded, original)
        assert loaded.momentum_decays == (0.5, 0.9) and loaded.factored_decays == (0.8, 0.95)
        assert len(loaded.mlp_layers()) == 4 and loaded.mlp[0].out_features == 5


@pytest.mark.reference
def test_test_checkpoint_converts_bit_for_bit(tmp_path, test_net):
    test_net.save_pretrained(tmp_path / "converted")
    _assert_same_weights(Celo2Net.from_pretrained(tmp_path / "converted"), test_net)


def test_push_to_hub_then_load_by_id_is_exact(hub, hf_cache):
    torch.manual_seed(3)
    pushed = Celo2Net(mlp_hidden_size=6)
    pushed.push_to_hub("celo2-org/own-format")
    files = hub.files("celo2-org/own-format")
    assert {"config.json", "model.safetensors", "README.md"} <= set(files)
    assert json.loads(files["config.json"])["update_rule"] == "celo2"
    _assert_same_weights(load_celo2_net("celo2-org/own-format", cache_dir=hf_cache), pushed)


def test_hub_revision_and_unknown_repo(hub, hf_cache):
    repo = "celo2-org/revisions"
    torch.manual_seed(1)
    first = Celo2Net()
    first.push_to_hub(repo)
    first_sha = hub.repos[repo].branches["main"]
    torch.manual_seed(2)
    second = Celo2Net()
    second.push_to_hub(repo)
    _assert_same_weights(load_celo2_net(repo, cache_dir=hf_cache), second)
    _assert_same_weights(load_celo2_net(repo, revision=first_sha, cache_dir=hf_cache), first)
    with pytest.raises(CeloWeightsError, match="no revision 'v9'"):
        load_celo2_net(repo, revision="v9", cache_dir=hf_cache)
    with pytest.raises(CeloWeightsError, match="'nobody/no-celo2' was not found"):
        load_celo2_net("nobody/no-celo2", cache_dir=hf_cache)


# ---- the other rule's weights are refused -----------------------------------------------------------------


@pytest.mark.reference
def test_paper_checkpoints_of_the_other_rule_are_refused(hub, hf_cache):
    with pytest.raises(CeloWeightsError, match=re.escape("is a Celo (v1) checkpoint (it has the scheduler's")) as error:
        load_celo2_net(PAPER_WEIGHTS)
    _message(error, PAPER_WEIGHTS, "not a Celo2 one", "celo_hf.Celo")
    with pytest.raises(CeloWeightsError, match=re.escape("is a Celo2 checkpoint (it has only the MLP")) as error:
        load_celo_net(CELO2_TEST_WEIGHTS)
    _message(error, CELO2_TEST_WEIGHTS, "not a Celo (v1) one", "Celo2Net")
    hub.add_files("amoudgl/celo2-for-v1", {"theta.state": CELO2_TEST_WEIGHTS.read_bytes()})
    with pytest.raises(CeloWeightsError, match="is a Celo2 checkpoint"):
        load_celo_net("amoudgl/celo2-for-v1", cache_dir=hf_cache)


@pytest.mark.reference
def test_v1_tree_without_its_scheduler_is_still_refused(tmp_path):
    """Celo's MLP leaves alone are recognised by their stack axis of 1 (``w1`` is ``(1, 4, 4)``)."""
    tree = msgpack.unpackb(PAPER_WEIGHTS.read_bytes(), ext_hook=msgpack.ExtType, raw=False, strict_map_key=False)
    path = _write(tmp_path / "theta.state", {"ff_mod_stack": tree["ff_mod_stack"]})
    with pytest.raises(CeloWeightsError, match=re.escape("is a Celo (v1) checkpoint")) as error:
        load_celo2_net(path)
    _message(error, path)


def test_folders_of_the_other_rule_are_refused(own_folder, tmp_path):
    with pytest.raises(CeloWeightsError, match=re.escape("is for Celo2 (update_rule 'celo2'), not Celo (v1)")) as error:
        load_celo_net(own_folder)
    _message(error, own_folder / "config.json")
    CeloNet(mlp_hidden_size=3).save_pretrained(tmp_path / "v1")
    assert json.loads((tmp_path / "v1" / "config.json").read_text())["update_rule"] == "celo"
    with pytest.raises(CeloWeightsError, match=re.escape("is for Celo (v1) (update_rule 'celo'), not Celo2")) as error:
        load_celo2_net(tmp_path / "v1")
    _message(error, tmp_path / "v1" / "config.json", "celo_hf.Celo")


def test_legacy_v1_folders_load_as_v1_only(tmp_path):
    """Folders written before ``update_rule`` existed (the committed default is one) are Celo's."""
    torch.manual_seed(0)
    legacy = CeloNet(mlp_hidden_size=3)
    legacy.save_pretrained(tmp_path / "legacy")
    config = tmp_path / "legacy" / "config.json"
    config.write_text(json.dumps({k: v for k, v in json.loads(config.read_text()).items() if k != "update_rule"}))
    _assert_same_weights(load_celo_net(tmp_path / "legacy"), legacy)
    assert isinstance(load_celo_net(DEFAULT_WEIGHTS_DIR), CeloNet)
    problem = "is for Celo (v1) (no update_rule: written before Celo2 existed), not Celo2"
    for folder in (tmp_path / "legacy", DEFAULT_WEIGHTS_DIR):
        with pytest.raises(CeloWeightsError, match=re.escape("is for Celo (v1) (")) as error:
            load_celo2_net(folder)
        _message(error, folder / "config.json", "not Celo2")
    with pytest.raises(CeloWeightsError, match=re.escape(problem)):
        load_celo2_net(tmp_path / "legacy")


def test_unknown_rule_is_named(own_folder):
    config = own_folder / "config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | {"update_rule": "adam"}))
    problem = "update_rule 'adam' is not one of ['celo', 'celo2']"
    with pytest.raises(CeloWeightsError, match=re.escape(problem)) as error:
        load_celo2_net(own_folder)
    _message(error, config)


def test_a_celonet_instance_is_not_a_celo2net():
    with pytest.raises(TypeError, match="weights must be a Celo2Net, a path, a Hub model id or None, got CeloNet"):
        load_celo2_net(CeloNet())


# ---- the embedded default --------------------------------------------------------------------------------


def test_no_default_names_the_alternatives(monkeypatch, tmp_path):
    monkeypatch.setattr(celo2_hub, "DEFAULT_CELO2_WEIGHTS_DIR", tmp_path / "no_default")
    with pytest.raises(CeloWeightsError, match="no embedded default weights for Celo2") as error:
        load_celo2_net(None)
    _message(error, tmp_path / "no_default", "theta.state", "config.json + model.safetensors", "Hub model id",
             "'amoudgl/celo2'", "'amoudgl/celo2-base'")


def test_default_folder_serves_none(monkeypatch, own_folder):
    monkeypatch.setattr(celo2_hub, "DEFAULT_CELO2_WEIGHTS_DIR", own_folder)
    _assert_same_weights(load_celo2_net(None), Celo2Net.from_pretrained(own_folder))
