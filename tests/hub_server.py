"""A tiny, stdlib-only loopback implementation of the Hugging Face Hub HTTP API, for tests.

It implements just what ``huggingface_hub`` 2.4 needs for model repos (see
``huggingface_hub/file_download.py`` and ``hf_api.py``): ``hf_hub_download``, ``snapshot_download``,
``HfApi.model_info / repo_info / list_repo_files / list_repo_tree / file_exists / list_repo_refs``,
``create_repo``, ``create_branch``, ``create_commit`` / ``upload_file`` / ``upload_folder`` and
``PyTorchModelHubMixin.push_to_hub / from_pretrained``. Files are always stored "regular" (no LFS, no Xet).

Usage::

    hub = LoopbackHub()                       # listens on http://127.0.0.1:<free port>
    sha = hub.add_files("org/name", {"config.json": b"{}"})
    os.environ["HF_ENDPOINT"] = hub.url       # must happen before huggingface_hub is imported
    ...
    hub.close()

Errors use the ``X-Error-Code`` header exactly as the client maps them (``huggingface_hub.utils._http``):
``RepoNotFound`` -> RepositoryNotFoundError, ``RevisionNotFound`` -> RevisionNotFoundError,
``EntryNotFound`` -> RemoteEntryNotFoundError, ``GatedRepo`` -> GatedRepoError.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import os
import subprocess
import sys
import threading
import traceback
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

_ACTIONS = {"resolve", "revision", "tree", "preupload", "commit", "refs", "branch"}
Response = tuple[int, dict, bytes]


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob (what the Hub reports as ``oid``/``ETag`` for non-LFS files)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubError(Exception):
    """Raised inside request handling; becomes an HTTP error response with Hub-style headers."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None,
                 extra: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.headers, self.extra = status, code, headers or {}, extra or {}


@dataclass
class Repo:
    """One model repo: ``commits`` maps a 40-hex sha to a full snapshot ``{path: bytes}``."""

    private: bool = False
    gated: bool = False
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)


class LoopbackHub:
    """In-memory Hub served by a ``ThreadingHTTPServer`` on 127.0.0.1 (port 0) in a daemon thread.

    Attributes: ``url`` (the endpoint, no trailing slash), ``token`` (the only token accepted for private/gated
    repos and for writes), ``repos`` (``{repo_id: Repo}``), ``requests`` (log of ``(method, path)`` tuples, path
    without query string and still URL-quoted, e.g. ``("HEAD", "/org/name/resolve/main/config.json")``).
    """

    def __init__(self, token: str = "hf_loopback_token"):
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self._lock = threading.RLock()
        self._counter = itertools.count()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._server.hub = self  # type: ignore[attr-defined]
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="loopback-hub", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ seeding API (used by tests directly)
    def create_repo(self, repo_id: str, private: bool = False, gated: bool = False, exist_ok: bool = True) -> Repo:
        """Create an empty repo whose ``main`` branch points to an empty initial commit."""
        with self._lock:
            if repo_id in self.repos:
                if not exist_ok:
                    raise ValueError(f"repo {repo_id} exists")
                return self.repos[repo_id]
            repo = self.repos[repo_id] = Repo(private=private, gated=gated)
            repo.branches["main"] = self._new_commit(repo, {})
            return repo

    def add_files(self, repo_id: str, files: dict[str, bytes], revision: str = "main",
                  delete: tuple[str, ...] = ()) -> str:
        """Commit ``files`` (and deletions) on branch ``revision`` (created from ``main`` if new); return the sha.

        The repo is created (public) if needed. Commit shas are unique per commit, even with identical content.
        """
        with self._lock:
            repo = self.create_repo(repo_id)
            base = repo.commits[repo.branches.get(revision, repo.branches["main"])]
            snapshot = {p: b for p, b in base.items() if p not in delete}
            snapshot.update({p: bytes(b) for p, b in files.items()})
            sha = repo.branches[revision] = self._new_commit(repo, snapshot)
            return sha

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """The snapshot ``{path: bytes}`` of a branch or commit (e.g. to check what a client uploaded)."""
        repo = self.repos[repo_id]
        return dict(repo.commits[repo.branches.get(revision, revision)])

    def clear_log(self) -> None:
        self.requests.clear()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _new_commit(self, repo: Repo, snapshot: dict[str, bytes]) -> str:
        sha = hashlib.sha1(f"loopback-commit-{next(self._counter)}-{id(repo)}".encode()).hexdigest()
        repo.commits[sha] = snapshot
        return sha

    # ------------------------------------------------------------------ request dispatch
    def handle(self, method: str, raw_path: str, headers, body: bytes) -> Response:
        """Route one request; return ``(status, headers, body)``. ``headers`` is the request's header mapping."""
        split = urlsplit(raw_path)
        query = {k: v[-1] for k, v in parse_qs(split.query).items()}
        segs = [unquote(s) for s in split.path.strip("/").split("/")]
        auth = headers.get("Authorization", "")
        with self._lock:
            self.requests.append((method, split.path))
            try:
                if method == "GET" and split.path == "/api/whoami-v2":
                    self._check_write(auth)
                    return _json({"type": "user", "name": "loopback-user", "orgs": [],
                                  "auth": {"accessToken": {"role": "write"}}})
                if method == "POST" and split.path == "/api/validate-yaml":
                    return _json({"errors": [], "warnings": []})
                if method == "POST" and split.path == "/api/repos/create":
                    return self._create(auth, json.loads(body or b"{}"))
                if segs[:2] == ["api", "models"]:
                    repo_id, action, rest = _split_repo(segs[2:])
                    return self._api(method, repo_id, action, rest, query, auth, body)
                repo_id, action, rest = _split_repo(segs, {"resolve"})
                if action == "resolve" and rest and method in ("GET", "HEAD"):
                    return self._resolve(repo_id, rest[0], "/".join(rest[1:]), auth, headers.get("Range"))
                raise HubError(404, f"no route for {method} {split.path}")
            except HubError as e:
                hdrs = dict(e.headers)
                if e.code:
                    hdrs["X-Error-Code"] = e.code
                hdrs["X-Error-Message"] = str(e)
                body = json.dumps({"error": str(e), **e.extra}).encode()
                return e.status, {**hdrs, "Content-Type": "application/json"}, body
            except Exception as e:  # a bug or unsupported input: 501 fails fast (5xx codes that are retried don't)
                traceback.print_exc()
                msg = f"LoopbackHub internal error: {e!r}".replace("\n", " ")
                hdrs = {"X-Error-Message": msg, "Content-Type": "application/json"}
                return 501, hdrs, json.dumps({"error": msg}).encode()

    def _repo(self, repo_id: str, auth: str) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None:
            raise HubError(404, "Repository not found", "RepoNotFound")
        if (repo.private or repo.gated) and auth != f"Bearer {self.token}":
            if repo.gated:
                raise HubError(401, "Access to this gated repo requires a token", "GatedRepo")
            raise HubError(401, "Repository not found", "RepoNotFound")  # what the real Hub does for private repos
        return repo

    def _check_write(self, auth: str) -> None:
        if auth != f"Bearer {self.token}":  # no X-Error-Code: the client raises a plain HfHubHTTPError (401)
            raise HubError(401, "Invalid credentials in Authorization header")

    @staticmethod
    def _sha(repo: Repo, revision: str) -> str:
        sha = repo.branches.get(revision, revision)
        if sha not in repo.commits:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return sha

    def _create(self, auth: str, payload: dict) -> Response:
        self._check_write(auth)
        repo_id = "/".join(p for p in (payload.get("organization"), payload["name"]) if p)
        if payload.get("type", "model") != "model":
            raise HubError(400, "the loopback hub only hosts model repos")
        if repo_id in self.repos:
            # the client reads "url" from the 409 body when exist_ok=True
            raise HubError(409, "You already created this model repo", extra={"url": f"{self.url}/{repo_id}"})
        self.create_repo(repo_id, private=payload.get("visibility") == "private")
        return _json({"url": f"{self.url}/{repo_id}", "name": repo_id})

    def _resolve(self, repo_id: str, revision: str, path: str, auth: str, range_header: str | None) -> Response:
        repo = self._repo(repo_id, auth)
        sha = self._sha(repo, revision)
        if path not in repo.commits[sha]:
            raise HubError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": sha})
        data = repo.commits[sha][path]
        hdrs = {"X-Repo-Commit": sha, "ETag": f'"{git_blob_sha1(data)}"', "Accept-Ranges": "bytes",
                "Content-Type": "application/octet-stream"}
        if range_header and range_header.startswith("bytes=") and range_header[6:].endswith("-"):
            start = int(range_header[6:-1])  # only the "bytes=N-" form that resumed downloads use
            hdrs["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            return 206, hdrs, data[start:]
        return 200, hdrs, data

    def _api(self, method: str, repo_id: str, action: str | None, rest: list[str], query: dict,
             auth: str, body: bytes) -> Response:
        repo = self._repo(repo_id, auth)
        if method == "GET" and action in (None, "revision"):
            sha = self._sha(repo, rest[0] if rest else "main")
            return _json({"id": repo_id, "modelId": repo_id, "sha": sha, "private": repo.private,
                          "gated": "auto" if repo.gated else False, "disabled": False, "tags": [],
                          "downloads": 0, "likes": 0,
                          "siblings": [{"rfilename": p} for p in sorted(repo.commits[sha])]})
        if method == "GET" and action == "tree" and rest:
            snapshot = repo.commits[self._sha(repo, rest[0])]
            return _json(_tree(snapshot, "/".join(rest[1:]), query.get("recursive", "").lower() in ("1", "true")))
        if method == "GET" and action == "refs":
            return _json({"branches": [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": s}
                                       for b, s in sorted(repo.branches.items())], "tags": [], "converts": []})
        self._check_write(auth)
        if method == "POST" and action == "branch" and rest:
            start = json.loads(body or b"{}").get("startingPoint") or "main"
            if rest[0] in repo.branches:
                raise HubError(409, f"Branch {rest[0]} already exists")
            repo.branches[rest[0]] = self._sha(repo, start)
            return _json({})
        if method == "POST" and action == "preupload" and rest:
            snapshot = repo.commits[self._sha(repo, rest[0])]
            files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                      "oid": git_blob_sha1(snapshot[f["path"]]) if f["path"] in snapshot else None}
                     for f in json.loads(body)["files"]]
            return _json({"files": files, "commitOid": repo.branches.get(rest[0], rest[0])})
        if method == "POST" and action == "commit" and rest:
            return self._commit(repo_id, repo, rest[0], query, body)
        raise HubError(404, f"no route for {method} {action} on {repo_id}")

    def _commit(self, repo_id: str, repo: Repo, branch: str, query: dict, body: bytes) -> Response:
        if query.get("create_pr"):
            raise HubError(400, "the loopback hub does not support pull requests")
        if branch not in repo.branches:
            raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
        snapshot = dict(repo.commits[repo.branches[branch]])
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                parent = value.get("parentCommit")
                if parent and parent != repo.branches[branch]:
                    raise HubError(412, f"parentCommit {parent} is not the head of {branch}")
            elif key == "file":
                content = value["content"]
                snapshot[value["path"]] = (base64.b64decode(content) if value.get("encoding") == "base64"
                                           else content.encode())
            elif key == "deletedFile":
                snapshot.pop(value["path"], None)
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                snapshot = {p: b for p, b in snapshot.items() if not p.startswith(prefix)}
            else:
                raise HubError(400, f"unsupported commit operation {key!r} (no LFS on the loopback hub)")
        sha = repo.branches[branch] = self._new_commit(repo, snapshot)
        return _json({"commitUrl": f"{self.url}/{repo_id}/commit/{sha}", "commitOid": sha,
                      "pullRequestUrl": None, "success": True})


def _split_repo(segs: list[str], actions=_ACTIONS) -> tuple[str, str | None, list[str]]:
    """Split ``[org, name, action, *rest]`` or ``[name, action, *rest]`` (or a bare repo id)."""
    for n in (2, 1):
        if len(segs) > n and segs[n] in actions:
            return "/".join(segs[:n]), segs[n], segs[n + 1:]
    return "/".join(segs), None, []


def _tree(snapshot: dict[str, bytes], prefix: str, recursive: bool) -> list[dict]:
    """Tree listing entries (files and directories) under ``prefix``, in the Hub's JSON format."""
    base = prefix.strip("/") + "/" if prefix.strip("/") else ""
    if base and not any(p.startswith(base) for p in snapshot):
        raise HubError(404, f"{prefix} does not exist", "EntryNotFound")
    entries: dict[str, dict] = {}
    for path, data in sorted(snapshot.items()):
        if not path.startswith(base):
            continue
        parts = path[len(base):].split("/")
        for i in range(1, len(parts)):  # the directories between prefix and the file
            if i > 1 and not recursive:
                break
            d = base + "/".join(parts[:i])
            entries.setdefault(d, {"type": "directory", "path": d, "oid": hashlib.sha1(d.encode()).hexdigest(),
                                   "size": 0})
        if recursive or len(parts) == 1:
            entries[path] = {"type": "file", "path": path, "oid": git_blob_sha1(data), "size": len(data)}
    return list(entries.values())


def _json(obj) -> Response:
    return 200, {"Content-Type": "application/json"}, json.dumps(obj).encode()


class _Handler(BaseHTTPRequestHandler):
    """HTTP/1.1 adapter: reads the body (Content-Length or chunked), calls ``LoopbackHub.handle``."""

    protocol_version = "HTTP/1.1"

    def _serve(self) -> None:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            body = b""
            while size := int(self.rfile.readline().split(b";")[0], 16):
                body += self.rfile.read(size)
                self.rfile.readline()
            self.rfile.readline()
        else:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        status, headers, payload = self.server.hub.handle(self.command, self.path, self.headers, body)
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _serve

    def log_message(self, format, *args) -> None:  # keep pytest output clean
        pass


def run_python(code: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (current ``os.environ`` updated with ``env``; a value of ``None`` removes
    the variable). Needed for settings huggingface_hub reads at import time, e.g. ``{"HF_HUB_OFFLINE": "1"}``.
    Returns the CompletedProcess (text mode, stdout/stderr captured); raises AssertionError with both streams
    if the exit status is not 0.
    """
    full_env = dict(os.environ)
    for key, value in (env or {}).items():
        if value is None:
            full_env.pop(key, None)
        else:
            full_env[key] = value
    proc = subprocess.run([sys.executable, "-c", code], env=full_env, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"subprocess failed ({proc.returncode})\n--- stdout\n{proc.stdout}\n"
                             f"--- stderr\n{proc.stderr}")
    return proc
