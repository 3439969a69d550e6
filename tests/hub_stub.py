"""A loopback stand-in for the Hugging Face Hub HTTP API, for tests.

`HubStub` is a standard-library `ThreadingHTTPServer` on 127.0.0.1 (OS-chosen port) that keeps repositories in
memory and answers the handful of endpoints that real `huggingface_hub` code (2.x) calls for
`create_repo`, `create_commit` / `upload_folder` / `push_to_hub`, `repo_info` / `model_info`, `list_repo_files` /
`list_repo_tree`, `get_paths_info`, `file_exists`, `create_branch`, `whoami` and `hf_hub_download` (HEAD + GET on
`/{repo_id}/resolve/{revision}/{filename}`). Nothing else is contacted.

Uploads never need LFS or Xet: the preupload endpoint answers ``"uploadMode": "regular"`` for every file, so the
client sends each file's bytes inline (base64) in the commit NDJSON.

Unknown repos answer 404 with ``X-Error-Code: RepoNotFound``, unknown files 404 with ``X-Error-Code: EntryNotFound``
(+ ``X-Repo-Commit``), unknown revisions 404 with ``X-Error-Code: RevisionNotFound``, so the client raises its usual
`RepositoryNotFoundError` / `EntryNotFoundError` / `RevisionNotFoundError`.

Pointing the client at the stub -- see `hub_env`. `huggingface_hub.constants` reads `HF_ENDPOINT`, `HF_HOME`,
`HF_HUB_CACHE`, `HF_HUB_DISABLE_XET`, `HF_HUB_OFFLINE`... once, at import time, and `HfApi` instances copy
`constants.ENDPOINT` when they are constructed (the module-level `huggingface_hub.hf_api.api` behind
`huggingface_hub.create_repo` etc., and `transformers.utils.hub._hf_api` behind `push_to_hub`). Setting the
environment variables alone is therefore not enough once huggingface_hub is imported; `hub_env` sets them (for
subprocesses and code reading `os.environ`, e.g. PEFT's offline check) *and* patches the already-imported constants
and cached `HfApi` instances, and closes the shared httpx client so a fresh one is built. Everything is restored on
exit.

Usage::

    with hub_env(monkeypatch) as hub:          # or the `hub` fixture in tests/conftest_hub.py
        model.push_to_hub("user/tiny-lora")
        assert "adapter_config.json" in hub.files("user/tiny-lora")
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator
from urllib.parse import parse_qs, quote, unquote, urlsplit

__all__ = ["HubStub", "hub_env", "DEFAULT_NAMESPACE", "DUMMY_TOKEN"]

DEFAULT_NAMESPACE = "user"  # namespace of the fake token's owner
DUMMY_TOKEN = "hf_stubtoken0000000000000000000000000"
_REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
_GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"


def _git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob " + str(len(data)).encode() + b"\0" + data).hexdigest()


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(ts))


@dataclass
class _Commit:
    sha: str
    files: dict[str, bytes]
    message: str
    timestamp: float


@dataclass
class _Repo:
    repo_type: str
    repo_id: str
    private: bool
    created: float
    commits: dict[str, _Commit] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)  # branch / refs/pr/N -> commit sha
    n_prs: int = 0

    def resolve(self, revision: str) -> _Commit | None:
        if revision in self.refs:
            return self.commits[self.refs[revision]]
        if len(revision) == 40 and revision in self.commits:
            return self.commits[revision]
        return None


class _HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


class HubStub:
    """In-memory Hub served over HTTP on 127.0.0.1. `start()` / `stop()`, or use as a context manager."""

    def __init__(self) -> None:
        self._repos: dict[tuple[str, str], _Repo] = {}
        self._lock = threading.RLock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request served, for assertions

    # -- lifecycle -------------------------------------------------------------------------------------------
    def start(self) -> "HubStub":
        if self._server is not None:
            return self
        handler = type("_BoundHandler", (_Handler,), {"stub": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="hub-stub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = self._thread = None

    def __enter__(self) -> "HubStub":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def endpoint(self) -> str:
        if self._server is None:
            raise RuntimeError("HubStub is not started")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    # -- inspection / seeding --------------------------------------------------------------------------------
    def files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        """Copy of the files of `repo_id` at `revision`. KeyError if the repo or revision does not exist."""
        with self._lock:
            repo = self._repos[(repo_type, repo_id)]
            commit = repo.resolve(revision)
            if commit is None:
                raise KeyError(revision)
            return dict(commit.files)

    def repo_ids(self, repo_type: str = "model") -> list[str]:
        with self._lock:
            return sorted(rid for (rtype, rid) in self._repos if rtype == repo_type)

    def commits(self, repo_id: str, repo_type: str = "model") -> list[str]:
        """Commit shas of a repo, oldest first."""
        with self._lock:
            return list(self._repos[(repo_type, repo_id)].commits)

    def create_repo(self, repo_id: str, repo_type: str = "model", private: bool = False) -> bool:
        """Create an empty repo (an initial commit with `.gitattributes`, like the Hub). False if it exists."""
        with self._lock:
            key = (repo_type, repo_id)
            if key in self._repos:
                return False
            repo = _Repo(repo_type, repo_id, private, time.time())
            self._repos[key] = repo
            self._commit(repo, "main", {".gitattributes": _GITATTRIBUTES}, [], "initial commit")
            return True

    def add_files(
        self, repo_id: str, files: dict[str, bytes], repo_type: str = "model", message: str = "seed"
    ) -> str:
        """Seed a repo directly (creating it if needed); returns the new commit sha."""
        with self._lock:
            self.create_repo(repo_id, repo_type)
            return self._commit(self._repos[(repo_type, repo_id)], "main", dict(files), [], message)

    def _commit(self, repo: _Repo, ref: str, added: dict[str, bytes], deleted: list[tuple[str, bool]], msg: str) -> str:
        base = repo.resolve(ref)
        files = dict(base.files) if base is not None else {}
        for path, is_folder in deleted:
            if is_folder:
                prefix = path.rstrip("/") + "/"
                doomed = [p for p in files if p.startswith(prefix)]
                if not doomed:
                    raise _HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
            else:
                if path not in files:
                    raise _HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                doomed = [path]
            for p in doomed:
                del files[p]
        files.update(added)
        now = time.time()
        sha = hashlib.sha1(f"{repo.repo_id}\0{ref}\0{uuid.uuid4()}\0{now}".encode()).hexdigest()
        repo.commits[sha] = _Commit(sha, files, msg, now)
        repo.refs[ref] = sha
        return sha

    # -- request routing (called from handler threads) -------------------------------------------------------
    def _url_prefix(self, repo: _Repo) -> str:
        return self.endpoint + ("" if repo.repo_type == "model" else f"/{repo.repo_type}s") + f"/{repo.repo_id}"

    def _get_repo(self, repo_type: str, repo_id: str) -> _Repo:
        repo = self._repos.get((repo_type, repo_id))
        if repo is None:
            raise _HubError(404, "Repository not found", "RepoNotFound")
        return repo

    def _get_commit(self, repo: _Repo, revision: str) -> _Commit:
        commit = repo.resolve(revision)
        if commit is None:
            raise _HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    def handle(self, h: "_Handler", method: str) -> None:
        url = urlsplit(h.path)
        segs = [unquote(s) for s in url.path.split("/") if s]
        query = parse_qs(url.query)
        with self._lock:
            self.requests.append((method, unquote(url.path)))
        try:
            with self._lock:
                if segs and segs[0] == "api":
                    self._api(h, method, segs[1:], query)
                else:
                    self._resolve(h, method, segs)
        except _HubError as err:
            headers = dict(err.headers)
            if err.code:
                headers["X-Error-Code"] = err.code
            headers["X-Error-Message"] = err.message
            h.send_json(err.status, {"error": err.message}, headers)

    def _api(self, h: "_Handler", method: str, segs: list[str], query: dict) -> None:
        if method == "POST" and segs == ["repos", "create"]:
            return self._api_create_repo(h)
        if method == "POST" and segs == ["validate-yaml"]:
            h.read_body()
            return h.send_json(200, {"errors": [], "warnings": []})
        if method == "GET" and segs == ["whoami-v2"]:
            return h.send_json(
                200,
                {
                    "type": "user",
                    "id": "0" * 24,
                    "name": DEFAULT_NAMESPACE,
                    "fullname": "Stub User",
                    "orgs": [],
                    "auth": {"type": "access_token", "accessToken": {"displayName": "stub", "role": "write"}},
                },
            )
        if len(segs) >= 3 and segs[0] in _REPO_TYPES:
            repo_type = _REPO_TYPES[segs[0]]
            rest = segs[1:]
            # repo ids are "namespace/name" (or a bare "name"); find where the action begins
            for n in (2, 1):
                if len(rest) >= n:
                    repo_id, action = "/".join(rest[:n]), rest[n:]
                    if (repo_type, repo_id) in self._repos or n == 1 or (action and action[0] in _ACTIONS):
                        break
            repo = self._get_repo(repo_type, repo_id)
            if method == "GET" and not action:
                return self._api_repo_info(h, repo, "main")
            if method == "GET" and action[0] == "revision" and len(action) >= 2:
                return self._api_repo_info(h, repo, "/".join(action[1:]))
            if method == "POST" and action[0] == "preupload" and len(action) >= 2:
                return self._api_preupload(h, repo, "/".join(action[1:]), query)
            if method == "POST" and action[0] == "commit" and len(action) >= 2:
                return self._api_commit(h, repo, "/".join(action[1:]), query)
            if method == "GET" and action[0] == "tree" and len(action) >= 2:
                # revision is URL-quoted by the client, so it is one segment; the rest is the folder
                return self._api_tree(h, repo, action[1], "/".join(action[2:]), query)
            if method == "POST" and action[0] == "paths-info" and len(action) >= 2:
                return self._api_paths_info(h, repo, "/".join(action[1:]))
            if method == "POST" and action[0] == "branch" and len(action) >= 2:
                return self._api_create_branch(h, repo, "/".join(action[1:]))
        h.read_body()
        raise _HubError(404, f"Stub hub does not implement {method} /api/{'/'.join(segs)}")

    def _api_create_repo(self, h: "_Handler") -> None:
        payload = h.read_json()
        name, org = payload.get("name"), payload.get("organization")
        repo_type = payload.get("type") or "model"
        if not name or repo_type not in _REPO_TYPES.values():
            raise _HubError(400, "Invalid repo name or type")
        repo_id = f"{org or DEFAULT_NAMESPACE}/{name}"
        private = payload.get("visibility", "public") != "public" or bool(payload.get("private"))
        created = self.create_repo(repo_id, repo_type, private)
        url = self._url_prefix(self._repos[(repo_type, repo_id)])
        if not created:
            return h.send_json(409, {"error": "You already created this model repo", "url": url})
        h.send_json(200, {"url": url, "name": repo_id, "id": uuid.uuid4().hex[:24]})

    def _api_repo_info(self, h: "_Handler", repo: _Repo, revision: str) -> None:
        commit = self._get_commit(repo, revision)
        info = {
            "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "author": repo.repo_id.split("/")[0] if "/" in repo.repo_id else DEFAULT_NAMESPACE,
            "sha": commit.sha,
            "lastModified": _iso(commit.timestamp),
            "createdAt": _iso(repo.created),
            "private": repo.private,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": [
                {"rfilename": p, "size": len(d), "blobId": _git_sha1(d)} for p, d in sorted(commit.files.items())
            ],
        }
        if repo.repo_type == "model":
            info["library_name"] = None
        if repo.repo_type == "space":
            info["sdk"] = "static"
        h.send_json(200, info)

    def _api_preupload(self, h: "_Handler", repo: _Repo, revision: str, query: dict) -> None:
        payload = h.read_json()
        commit = self._get_commit(repo, revision) if "create_pr" not in query else repo.resolve(revision)
        existing = commit.files if commit is not None else {}
        files = []
        for f in payload.get("files", []):
            path = f["path"]
            oid = _git_sha1(existing[path]) if path in existing else None
            files.append({"path": path, "uploadMode": "regular", "shouldIgnore": False, "oid": oid})
        h.send_json(200, {"files": files, "commitOid": commit.sha if commit else None})

    def _api_commit(self, h: "_Handler", repo: _Repo, revision: str, query: dict) -> None:
        body = h.read_body()
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise _HubError(400, "Commit payload must start with a header line")
        header = lines[0]["value"]
        base = self._get_commit(repo, revision)
        parent = header.get("parentCommit")
        if parent is not None and parent != base.sha:
            raise _HubError(412, "A commit has happened since. Please refresh and try again.")
        added: dict[str, bytes] = {}
        deleted: list[tuple[str, bool]] = []
        for line in lines[1:]:
            key, value = line.get("key"), line.get("value", {})
            if key == "file":
                content = value.get("content", "")
                added[value["path"]] = (
                    base64.b64decode(content) if value.get("encoding") == "base64" else content.encode()
                )
            elif key in ("deletedFile", "deletedFolder"):
                deleted.append((value["path"], key == "deletedFolder"))
            else:
                raise _HubError(400, f"Stub hub only accepts inline files, got a {key!r} operation")
        ref, pr_url = revision, None
        if "create_pr" in query:
            repo.n_prs += 1
            ref = f"refs/pr/{repo.n_prs}"
            repo.refs[ref] = base.sha
            pr_url = f"{self._url_prefix(repo)}/discussions/{repo.n_prs}"
        message = header.get("summary", "")
        sha = self._commit(repo, ref, added, deleted, message)
        h.send_json(
            200,
            {
                "success": True,
                "commitOid": sha,
                "commitUrl": f"{self._url_prefix(repo)}/commit/{sha}",
                "commitMessage": message,
                "hookOutput": "",
                "pullRequestUrl": pr_url,
            },
        )

    def _api_create_branch(self, h: "_Handler", repo: _Repo, branch: str) -> None:
        payload = h.read_json()
        if branch in repo.refs:
            raise _HubError(409, f"Branch {branch} already exists")
        start = self._get_commit(repo, payload.get("startingPoint") or "main")
        repo.refs[branch] = start.sha
        h.send_json(200, {})

    @staticmethod
    def _entries(files: dict[str, bytes], folder: str, recursive: bool) -> list[dict]:
        prefix = folder.strip("/") + "/" if folder.strip("/") else ""
        out: dict[str, dict] = {}
        for path, data in sorted(files.items()):
            if not path.startswith(prefix):
                continue
            parts = path[len(prefix) :].split("/")
            # parent folders (all of them if recursive, else only the first level)
            for depth in range(1, len(parts) if recursive else min(2, len(parts))):
                d = prefix + "/".join(parts[:depth])
                out.setdefault(d, {"type": "directory", "path": d, "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0})
            if recursive or len(parts) == 1:
                out[path] = {"type": "file", "path": path, "size": len(data), "oid": _git_sha1(data)}
        return sorted(out.values(), key=lambda e: e["path"])

    def _api_tree(self, h: "_Handler", repo: _Repo, revision: str, folder: str, query: dict) -> None:
        commit = self._get_commit(repo, revision)
        if folder and not any(p.startswith(folder.strip("/") + "/") for p in commit.files):
            raise _HubError(404, f"{folder} does not exist on {revision}", "EntryNotFound")
        recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
        h.send_json(200, self._entries(commit.files, folder, recursive))

    def _api_paths_info(self, h: "_Handler", repo: _Repo, revision: str) -> None:
        body = h.read_body()
        ctype = h.headers.get("Content-Type", "")
        if "json" in ctype:
            paths = json.loads(body or b"{}").get("paths", [])
        else:
            paths = parse_qs(body.decode()).get("paths", [])
        commit = self._get_commit(repo, revision)
        out = []
        for p in paths:
            p = p.strip("/")
            if p in commit.files:
                d = commit.files[p]
                out.append({"type": "file", "path": p, "size": len(d), "oid": _git_sha1(d)})
            elif any(f.startswith(p + "/") for f in commit.files):
                out.append({"type": "directory", "path": p, "oid": hashlib.sha1(p.encode()).hexdigest(), "size": 0})
        h.send_json(200, out)

    def _resolve(self, h: "_Handler", method: str, segs: list[str]) -> None:
        if method not in ("GET", "HEAD"):
            h.read_body()
            raise _HubError(405, "Method not allowed")
        repo_type = "model"
        if segs and segs[0] in _REPO_TYPES and segs[0] != "models":
            repo_type, segs = _REPO_TYPES[segs[0]], segs[1:]
        if "resolve" not in segs:
            raise _HubError(404, "Stub hub only serves /resolve/ URLs")
        i = segs.index("resolve")
        repo_id, rest = "/".join(segs[:i]), segs[i + 1 :]
        if len(rest) < 2:
            raise _HubError(404, "Missing revision or filename")
        repo = self._get_repo(repo_type, repo_id)
        revision, filename = rest[0], "/".join(rest[1:])  # revision is URL-quoted by the client => one segment
        commit = self._get_commit(repo, revision)
        if filename not in commit.files:
            raise _HubError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": commit.sha})
        data = commit.files[filename]
        headers = {
            "X-Repo-Commit": commit.sha,
            "ETag": f'"{_git_sha1(data)}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
            "Content-Disposition": f"inline; filename*=UTF-8''{quote(filename.rsplit('/', 1)[-1])}",
        }
        status, body = 200, data
        rng = h.headers.get("Range")
        if rng and rng.startswith("bytes=") and "," not in rng:
            start_s, _, end_s = rng[len("bytes=") :].partition("-")
            start = int(start_s) if start_s else max(len(data) - int(end_s), 0)
            end = int(end_s) if (start_s and end_s) else len(data) - 1
            if start >= len(data):
                raise _HubError(416, "Requested range not satisfiable", headers={"Content-Range": f"bytes */{len(data)}"})
            status, body = 206, data[start : end + 1]
            headers["Content-Range"] = f"bytes {start}-{start + len(body) - 1}/{len(data)}"
        h.send_bytes(status, body, headers, head_only=(method == "HEAD"))


_ACTIONS = {"revision", "preupload", "commit", "tree", "paths-info", "branch"}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like the real Hub; every response carries Content-Length
    server_version = "HubStub/1.0"
    timeout = 60  # idle keep-alive connections release their thread eventually
    stub: HubStub
    _body: bytes | None = None

    def log_message(self, format: str, *args) -> None:  # silence per-request stderr logging
        pass

    def do_GET(self) -> None:
        self._body = None  # one handler instance serves every request of a keep-alive connection
        self.stub.handle(self, "GET")

    def do_HEAD(self) -> None:
        self._body = None  # one handler instance serves every request of a keep-alive connection
        self.stub.handle(self, "HEAD")

    def do_POST(self) -> None:
        self._body = None  # one handler instance serves every request of a keep-alive connection
        self.stub.handle(self, "POST")

    def do_PUT(self) -> None:
        self._body = None  # one handler instance serves every request of a keep-alive connection
        self.stub.handle(self, "PUT")

    def do_DELETE(self) -> None:
        self._body = None  # one handler instance serves every request of a keep-alive connection
        self.stub.handle(self, "DELETE")

    def read_body(self) -> bytes:
        if self._body is not None:
            return self._body
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            self._body = b"".join(chunks)
        else:
            self._body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        return self._body

    def read_json(self) -> dict:
        body = self.read_body()
        return json.loads(body) if body else {}

    def send_bytes(self, status: int, body: bytes, headers: dict | None = None, head_only: bool = False) -> None:
        self.read_body()  # drain any request body so the keep-alive connection stays in sync
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head_only and self.command != "HEAD":
            self.wfile.write(body)

    def send_json(self, status: int, payload, headers: dict | None = None) -> None:
        self.send_bytes(status, json.dumps(payload).encode(), {"Content-Type": "application/json", **(headers or {})})


@contextlib.contextmanager
def hub_env(monkeypatch=None, home: str | os.PathLike | None = None) -> Iterator[HubStub]:
    """Start a `HubStub` and point huggingface_hub (and transformers / PEFT through it) at it.

    `monkeypatch`: a pytest `MonkeyPatch`; if None a private one is used and undone on exit (with a pytest
    fixture's monkeypatch, patches are undone at test teardown as usual). `home`: directory for HF_HOME (cache
    under `home/hub`, token under `home/token`); a temporary directory is used if None. The stub is stopped and the
    shared httpx client closed on exit.
    """
    import pytest

    owned = monkeypatch is None
    mp = pytest.MonkeyPatch() if owned else monkeypatch
    tmp = tempfile.TemporaryDirectory(prefix="hub-stub-") if home is None else None
    home = os.fspath(home) if home is not None else tmp.name
    cache = os.path.join(home, "hub")
    os.makedirs(cache, exist_ok=True)
    stub = HubStub().start()
    stub_endpoint = stub.endpoint
    try:
        _point_at(mp, stub.endpoint, home, cache)
        yield stub
    finally:
        try:
            _close_http_session()
            stub.stop()
            tf_hub = sys.modules.get("transformers.utils.hub")
            if getattr(getattr(tf_hub, "_hf_api", None), "endpoint", None) == stub_endpoint:
                tf_hub._hf_api = None  # created during the test with the stub's endpoint: drop it
        finally:
            if owned:
                mp.undo()
                _close_http_session()
            if tmp is not None:
                tmp.cleanup()


def _close_http_session() -> None:
    from huggingface_hub.utils import _http

    _http.close_session()


def _point_at(mp, endpoint: str, home: str, cache: str) -> None:
    from urllib.parse import urlsplit as _split

    import huggingface_hub.constants as C
    import huggingface_hub.hf_api as hf_api_mod

    env = {
        "HF_ENDPOINT": endpoint,
        "HF_HOME": home,
        "HF_HUB_CACHE": cache,
        "HF_TOKEN": DUMMY_TOKEN,
        "HF_TOKEN_PATH": os.path.join(home, "token"),
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_OFFLINE": "0",
        "TRANSFORMERS_OFFLINE": "0",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "NO_PROXY": ",".join(filter(None, ["127.0.0.1", "localhost", os.environ.get("NO_PROXY")])),
    }
    for k, v in env.items():
        mp.setenv(k, v)
    for k in ("HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE", "HUGGINGFACE_CO_STAGING", "HUGGINGFACE_HUB_CACHE"):
        mp.delenv(k, raising=False)

    consts = {
        "ENDPOINT": endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_URL_HOSTS": frozenset(C.HF_URL_HOSTS | {_split(endpoint).hostname}),
        "HF_HOME": home,
        "HF_HUB_CACHE": cache,
        "HUGGINGFACE_HUB_CACHE": cache,
        "HF_ASSETS_CACHE": os.path.join(home, "assets"),
        "HF_TOKEN_PATH": os.path.join(home, "token"),
        "HF_STORED_TOKENS_PATH": os.path.join(home, "stored_tokens"),
        "HF_HUB_DISABLE_XET": True,
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_TELEMETRY": True,
    }
    for name, value in consts.items():
        if hasattr(C, name):
            mp.setattr(C, name, value)

    # HfApi instances copy constants.ENDPOINT at construction time.
    mp.setattr(hf_api_mod.api, "endpoint", endpoint)
    tf_hub = sys.modules.get("transformers.utils.hub")
    if tf_hub is not None and hasattr(tf_hub, "_hf_api"):
        mp.setattr(tf_hub, "_hf_api", None)  # rebuilt lazily from the patched constants
    _close_http_session()  # next request builds a fresh client (reads NO_PROXY etc. again)
