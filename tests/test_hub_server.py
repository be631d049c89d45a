"""The loopback Hub (tests/hub_server.py) driven by the real huggingface_hub client."""

import json
import os
import urllib.request

import pytest
import torch
from huggingface_hub import HfApi, PyTorchModelHubMixin, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)


def read(path):
    with open(path, "rb") as f:
        return f.read()


def test_environment_points_at_loopback_hub(hub):
    from huggingface_hub import constants

    assert constants.ENDPOINT == hub.url == os.environ["HF_ENDPOINT"]
    assert constants.HF_HUB_CACHE.startswith(os.environ["HF_HOME"])
    assert not constants.HF_HUB_OFFLINE


def test_download_then_served_from_cache(hub, hf_cache):
    sha = hub.add_files("test/download", {"theta.state": b"\x01\x02weights", "config.json": b"{}"})
    hub.clear_log()
    path = hf_hub_download("test/download", "theta.state", cache_dir=hf_cache)
    assert read(path) == b"\x01\x02weights"
    assert f"/snapshots/{sha}/" in path.replace(os.sep, "/")
    assert hub.requests == [("HEAD", "/test/download/resolve/main/theta.state"),
                            ("GET", "/test/download/resolve/main/theta.state")]
    hub.clear_log()
    assert hf_hub_download("test/download", "theta.state", cache_dir=hf_cache) == path
    assert hub.requests == [("HEAD", "/test/download/resolve/main/theta.state")]


def test_revision_by_branch_and_by_sha(hub, hf_cache):
    old = hub.add_files("test/revisions", {"w.bin": b"old"})
    dev = hub.add_files("test/revisions", {"w.bin": b"dev", "extra.txt": b"x"}, revision="dev")
    new = hub.add_files("test/revisions", {"w.bin": b"new"})
    assert len({old, dev, new}) == 3 and all(len(s) == 40 for s in (old, dev, new))
    get = lambda rev: read(hf_hub_download("test/revisions", "w.bin", revision=rev, cache_dir=hf_cache))
    assert get("main") == get(new) == b"new"
    assert get("dev") == get(dev) == b"dev"
    assert get(old) == b"old"
    api = HfApi()
    assert api.model_info("test/revisions").sha == new
    assert api.model_info("test/revisions", revision="dev").sha == dev
    assert sorted(api.list_repo_files("test/revisions", revision="dev")) == ["extra.txt", "w.bin"]
    assert api.file_exists("test/revisions", "extra.txt", revision="dev")
    assert not api.file_exists("test/revisions", "extra.txt")
    refs = api.list_repo_refs("test/revisions")
    assert {b.name: b.target_commit for b in refs.branches} == {"main": new, "dev": dev}


def test_snapshot_download(hub, hf_cache):
    files = {"config.json": b'{"hidden": 8}', "model.safetensors": os.urandom(3000), "sub/dir/notes.md": b"# hi"}
    sha = hub.add_files("test/snapshot", files)
    folder = snapshot_download("test/snapshot", cache_dir=hf_cache)
    assert os.path.basename(folder) == sha
    for name, data in files.items():
        assert read(os.path.join(folder, name)) == data
    only_json = snapshot_download("test/snapshot", cache_dir=hf_cache, allow_patterns=["*.json"])
    assert only_json == folder
    tree = {f.path: f for f in HfApi().list_repo_tree("test/snapshot", recursive=True)}
    assert tree["model.safetensors"].size == 3000 and "sub/dir" in tree


def test_create_repo_upload_folder_round_trip(hub, hf_cache, tmp_path):
    api = HfApi()
    url = api.create_repo("test/upload", exist_ok=True)
    assert url.repo_id == "test/upload"
    assert api.create_repo("test/upload", exist_ok=True).repo_id == "test/upload"  # 409 tolerated
    with pytest.raises(HfHubHTTPError) as err:
        api.create_repo("test/upload")
    assert err.value.response.status_code == 409

    src = tmp_path / "src"
    (src / "nested").mkdir(parents=True)
    (src / "config.json").write_text('{"a": 1}')
    (src / "nested" / "weights.bin").write_bytes(bytes(range(256)) * 40)
    info = api.upload_folder(repo_id="test/upload", folder_path=src, commit_message="first")
    assert hub.repos["test/upload"].branches["main"] == info.oid
    assert hub.files("test/upload") == {"config.json": b'{"a": 1}', "nested/weights.bin": bytes(range(256)) * 40}
    path = hf_hub_download("test/upload", "nested/weights.bin", cache_dir=hf_cache)
    assert read(path) == bytes(range(256)) * 40

    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    second = api.create_commit("test/upload", operations=[CommitOperationDelete("nested/"),
                                                          CommitOperationAdd("config.json", b'{"a": 2}')],
                               commit_message="second")
    assert sorted(api.list_repo_files("test/upload")) == ["config.json"]
    assert read(hf_hub_download("test/upload", "config.json", revision=second.oid, cache_dir=hf_cache)) == b'{"a": 2}'
    assert read(hf_hub_download("test/upload", "config.json", revision=info.oid, cache_dir=hf_cache)) == b'{"a": 1}'


def test_error_mapping(hub, hf_cache):
    hub.add_files("test/errors", {"present.txt": b"here"})
    with pytest.raises(RemoteEntryNotFoundError) as err:
        hf_hub_download("test/errors", "missing.txt", cache_dir=hf_cache)
    assert isinstance(err.value, EntryNotFoundError) and err.value.response.status_code == 404
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("test/no-such-repo", "present.txt", cache_dir=hf_cache)
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download("test/errors", "present.txt", revision="no-such-branch", cache_dir=hf_cache)
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download("test/errors", "present.txt", revision="0" * 40, cache_dir=hf_cache)
    with pytest.raises(RepositoryNotFoundError):
        HfApi().model_info("test/no-such-repo")
    with pytest.raises(RevisionNotFoundError):
        snapshot_download("test/errors", revision="no-such-branch", cache_dir=hf_cache)
    with pytest.raises(HfHubHTTPError) as err:  # writes need the right token
        HfApi(token="hf_wrong").create_repo("test/unauthorised")
    assert err.value.response.status_code == 401 and "test/unauthorised" not in hub.repos


def test_private_and_gated_repos_need_the_token(hub, hf_cache):
    hub.create_repo("test/private", private=True)
    hub.add_files("test/private", {"secret.bin": b"s3cret"})
    for token in (False, "hf_wrong"):
        with pytest.raises(RepositoryNotFoundError) as err:
            hf_hub_download("test/private", "secret.bin", token=token, cache_dir=hf_cache)
        assert err.value.response.status_code == 401
        with pytest.raises(RepositoryNotFoundError):
            HfApi(token=token).model_info("test/private")
    assert read(hf_hub_download("test/private", "secret.bin", cache_dir=hf_cache)) == b"s3cret"  # HF_TOKEN env

    hub.create_repo("test/gated", gated=True)
    hub.add_files("test/gated", {"w.bin": b"g"})
    with pytest.raises(GatedRepoError):
        hf_hub_download("test/gated", "w.bin", token=False, cache_dir=hf_cache)
    assert read(hf_hub_download("test/gated", "w.bin", token=hub.token, cache_dir=hf_cache)) == b"g"


def test_raw_http_contract(hub):
    """Headers the client relies on, HEAD without body, Range resume, Content-Length everywhere."""
    sha = hub.add_files("test/raw", {"f.bin": b"0123456789"})
    url = f"{hub.url}/test/raw/resolve/main/f.bin"
    with urllib.request.urlopen(urllib.request.Request(url, method="HEAD")) as r:
        assert r.headers["X-Repo-Commit"] == sha and r.headers["Content-Length"] == "10"
        assert r.headers["ETag"].startswith('"') and r.read() == b""
    with urllib.request.urlopen(urllib.request.Request(url, headers={"Range": "bytes=4-"})) as r:
        assert r.status == 206 and r.read() == b"456789"
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"{hub.url}/test/raw/resolve/main/nope")
    assert err.value.code == 404 and err.value.headers["X-Error-Code"] == "EntryNotFound"
    assert err.value.headers["X-Repo-Commit"] == sha and "Content-Length" in err.value.headers
    with urllib.request.urlopen(f"{hub.url}/api/models/test/raw/tree/{sha}?recursive=true") as r:
        assert [e["path"] for e in json.loads(r.read())] == ["f.bin"]


class TinyNet(torch.nn.Module, PyTorchModelHubMixin, library_name="celo_hf"):
    def __init__(self, hidden: int = 4):
        super().__init__()
        self.lin = torch.nn.Linear(3, hidden)


def test_pytorch_model_hub_mixin_round_trip(hub, hf_cache):
    torch.manual_seed(0)
    model = TinyNet(hidden=8)
    model.push_to_hub("test/tinynet")
    assert {"config.json", "model.safetensors", "README.md"} <= set(hub.files("test/tinynet"))
    loaded = TinyNet.from_pretrained("test/tinynet", cache_dir=hf_cache)
    assert loaded.lin.out_features == 8
    assert torch.equal(loaded.lin.weight, model.lin.weight) and torch.equal(loaded.lin.bias, model.lin.bias)


def test_subprocess_inherits_loopback_environment(hub, hf_cache, run_python):
    hub.add_files("test/subprocess", {"a.txt": b"A"})
    hub.clear_log()
    code = f"""
import os
from huggingface_hub import constants, hf_hub_download
assert constants.ENDPOINT == {hub.url!r} and constants.HF_HOME == os.environ["HF_HOME"]
print(open(hf_hub_download("test/subprocess", "a.txt", cache_dir={hf_cache!r}), "rb").read().decode())
"""
    assert run_python(code).stdout.strip() == "A"
    assert ("GET", "/test/subprocess/resolve/main/a.txt") in hub.requests


def test_offline_mode_in_subprocess(hub, hf_cache, run_python):
    sha = hub.add_files("test/offline", {"cached.txt": b"from cache", "other.txt": b"never downloaded"})
    hf_hub_download("test/offline", "cached.txt", cache_dir=hf_cache)
    hub.add_files("test/offline-snap", {"a": b"1", "d/b": b"2"})
    snap = snapshot_download("test/offline-snap", cache_dir=hf_cache)
    code = f"""
import os
from huggingface_hub import constants, hf_hub_download, snapshot_download
from huggingface_hub.errors import LocalEntryNotFoundError
assert constants.HF_HUB_OFFLINE
path = hf_hub_download("test/offline", "cached.txt", cache_dir={hf_cache!r})
assert open(path, "rb").read() == b"from cache", path
assert {sha!r} in path
assert snapshot_download("test/offline-snap", cache_dir={hf_cache!r}) == {snap!r}
try:
    hf_hub_download("test/offline", "other.txt", cache_dir={hf_cache!r})
except LocalEntryNotFoundError as e:
    print("RAISED", type(e).__name__, type(e.__cause__).__name__)
"""
    hub.clear_log()
    proc = run_python(code, {"HF_HUB_OFFLINE": "1"})
    assert "RAISED LocalEntryNotFoundError OfflineModeIsEnabled" in proc.stdout
    assert hub.requests == []  # offline really means no request reached the server
