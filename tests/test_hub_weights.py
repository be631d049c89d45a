"""Celo weights by Hub model id, in both formats, against the loopback Hub server (tests/hub_server.py)."""

import pytest
import torch
from helpers import PAPER_WEIGHTS

from celo_hf import Celo, CeloNet, CeloWeightsError, load_celo_net


def _same_weights(a: CeloNet, b: CeloNet) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_paper_checkpoint_by_model_id_is_downloaded_once_then_cached(hub, hf_cache, paper_net):
    hub.add_files("amoudgl/celo-paper", {"theta.state": PAPER_WEIGHTS.read_bytes()})
    net = load_celo_net("amoudgl/celo-paper", cache_dir=hf_cache)
    assert _same_weights(net, paper_net)
    hub.clear_log()
    again = load_celo_net("amoudgl/celo-paper", cache_dir=hf_cache)
    assert _same_weights(again, paper_net)
    assert all(method == "HEAD" for method, _ in hub.requests), hub.requests


def test_push_to_hub_then_optimizer_loads_by_model_id(hub, hf_cache):
    torch.manual_seed(0)
    pushed = CeloNet(mlp_hidden_size=6)
    pushed.push_to_hub("celo-org/own-format")
    assert {"config.json", "model.safetensors", "README.md"} <= set(hub.files("celo-org/own-format"))
    param = torch.nn.Parameter(torch.ones(3, 2))
    optimizer = Celo([param], total_steps=5, weights="celo-org/own-format", cache_dir=hf_cache)
    assert _same_weights(optimizer.net, pushed)
    assert optimizer.net.mlp[0].out_features == 6


def test_revision_selects_the_commit(hub, hf_cache, paper_net):
    repo = "celo-org/revisions"
    torch.manual_seed(1)
    first = CeloNet()
    first.push_to_hub(repo)
    first_sha = hub.repos[repo].branches["main"]
    torch.manual_seed(2)
    CeloNet().push_to_hub(repo)
    assert not _same_weights(load_celo_net(repo, cache_dir=hf_cache), first)
    assert _same_weights(load_celo_net(repo, revision=first_sha, cache_dir=hf_cache), first)
    with pytest.raises(CeloWeightsError, match="no revision 'v9'"):
        load_celo_net(repo, revision="v9", cache_dir=hf_cache)


def test_private_repo_needs_the_token(hub, hf_cache, paper_net):
    hub.create_repo("celo-org/private", private=True)
    hub.add_files("celo-org/private", {"theta.state": PAPER_WEIGHTS.read_bytes()})
    with pytest.raises(CeloWeightsError, match="'celo-org/private' was not found .*private"):
        load_celo_net("celo-org/private", token=False, cache_dir=hf_cache)
    assert _same_weights(load_celo_net("celo-org/private", token=hub.token, cache_dir=hf_cache), paper_net)


def test_unknown_repo_and_missing_files_name_the_id(hub, hf_cache):
    with pytest.raises(CeloWeightsError, match="'nobody/nothing' was not found"):
        load_celo_net("nobody/nothing", cache_dir=hf_cache)
    hub.add_files("celo-org/empty", {"notes.txt": b"hello"})
    with pytest.raises(CeloWeightsError, match="'celo-org/empty'.*has neither config.json \\+ model.safetensors nor theta.state"):
        load_celo_net("celo-org/empty", cache_dir=hf_cache)
    hub.add_files("celo-org/config-only", {"config.json": b"{}"})
    with pytest.raises(CeloWeightsError, match="'celo-org/config-only' has config.json but not model.safetensors"):
        load_celo_net("celo-org/config-only", cache_dir=hf_cache)


def test_offline_mode_serves_the_cache_and_explains_a_miss(hub, hf_cache, run_python):
    hub.add_files("amoudgl/celo-offline", {"theta.state": PAPER_WEIGHTS.read_bytes()})
    load_celo_net("amoudgl/celo-offline", cache_dir=hf_cache)
    code = f"""
import celo_hf
net = celo_hf.load_celo_net("amoudgl/celo-offline", cache_dir={hf_cache!r})
print("loaded", sum(p.numel() for p in net.parameters()))
try:
    celo_hf.load_celo_net("amoudgl/never-downloaded", cache_dir={hf_cache!r})
except celo_hf.CeloWeightsError as err:
    print("error:", err)
"""
    hub.clear_log()
    result = run_python(code, {"HF_HUB_OFFLINE": "1"})
    assert "loaded 36064" in result.stdout
    assert "'amoudgl/never-downloaded' (revision main) is not in the local cache" in result.stdout
    assert hub.requests == []


def test_a_string_that_is_neither_a_path_nor_an_id_is_refused():
    with pytest.raises(CeloWeightsError, match="neither an existing file or folder nor a Hub model id"):
        load_celo_net("no/such/file.state")
