"""A loopback stand-in for the Hugging Face Hub: just the endpoints huggingface_hub 2.4 uses to push.

``FakeHub`` runs ``http.server`` in a thread on 127.0.0.1 (random port). Point huggingface_hub at it
with ``HF_ENDPOINT=hub.url``. It implements, with the request and response shapes of
``huggingface_hub/hf_api.py`` and ``_commit_api.py``:

- ``GET  /api/whoami-v2``                              who the token belongs to, and its role
- ``POST /api/repos/create``                           ``{"name", "organization", "visibility"}``
- ``GET  /api/models/{repo}[/revision/{rev}]``         repo info (create_repo's 403 path, no-op commits)
- ``POST /api/validate-yaml``                          README metadata check done before a commit
- ``POST /api/models/{repo}/preupload/{rev}``          answers ``uploadMode: "regular"`` for every file, so
  contents travel inline in the commit and neither LFS nor Xet storage is involved
- ``POST /api/models/{repo}/commit/{rev}``             NDJSON: a header line, then ``file`` lines with
  base64 content (``lfsFile`` lines are refused: nothing here should produce them)
- ``POST /api/models/{repo}/branch/{branch}``          create a branch from main
- ``GET  /api/agent-harnesses``                        huggingface_hub's telemetry registry (empty)

Authentication: ``Authorization: Bearer <token>`` must name one of ``tokens`` (401 otherwise, with
the Hub's "Invalid credentials" message). A user may write to their own namespace and to ``orgs``.

Every request is recorded (method, path, headers, body) in ``requests``; committed files are kept per
repo and branch in ``repos``. ``fail(pattern, status=500, times=N)`` makes matching requests fail
(``status=None`` drops the connection without answering; ``delay=`` stalls before answering).
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

import yaml


@dataclasses.dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    status: int | None = None


@dataclasses.dataclass
class Fault:
    pattern: str
    status: int | None = 500
    times: int | None = 1      # None: for ever
    delay: float = 0.0
    hits: int = 0


@dataclasses.dataclass
class Repo:
    owner: str
    private: bool
    branches: dict[str, dict[str, bytes]] = dataclasses.field(default_factory=lambda: {"main": {}})
    commits: list[dict] = dataclasses.field(default_factory=list)


def git_blob_sha1(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


class FakeHub:
    def __init__(self, tokens: dict[str, dict] | None = None):
        # token -> {"name": user, "role": "write"|"read", "orgs": [...]}
        default = {"hf_test_write_token_0123456789": {"name": "me", "role": "write"}}
        self.tokens = tokens if tokens is not None else default
        self.repos: dict[str, Repo] = {}
        self.requests: list[Recorded] = []
        self.faults: list[Fault] = []
        self.unhandled: list[str] = []
        self.lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ---- life cycle ----------------------------------------------------------------------------

    def start(self) -> "FakeHub":
        hub = self

        class Handler(_Handler):
            fake = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> "FakeHub":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._server is not None, "FakeHub is not started"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    # ---- test helpers --------------------------------------------------------------------------

    def fail(self, pattern: str, status: int | None = 500, *, times: int | None = 1, delay: float = 0.0) -> Fault:
        """Make requests whose "METHOD /path" matches ``pattern`` fail ``times`` times (None: always)."""
        fault = Fault(pattern, status, times, delay)
        self.faults.append(fault)
        return fault

    def add_repo(self, repo_id: str, *, owner: str, files: dict[str, bytes] | None = None) -> Repo:
        repo = Repo(owner=owner, private=False)
        repo.branches["main"].update(files or {})
        self.repos[repo_id] = repo
        return repo

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        return dict(self.repos[repo_id].branches[revision])

    def calls(self, pattern: str) -> list[Recorded]:
        return [r for r in self.requests if re.search(pattern, f"{r.method} {r.path}")]


class _Handler(BaseHTTPRequestHandler):
    fake: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # noqa: A002 - silence the default stderr access log
        pass

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def do_HEAD(self):
        self._dispatch("HEAD")

    # ---- plumbing --------------------------------------------------------------------------------

    def _dispatch(self, method: str) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        path = urlsplit(self.path).path
        record = Recorded(method, path, {k.lower(): v for k, v in self.headers.items()}, body)
        hub = self.fake
        with hub.lock:
            hub.requests.append(record)
            fault = next((f for f in hub.faults if re.search(f.pattern, f"{method} {path}")
                          and (f.times is None or f.hits < f.times)), None)
            if fault is not None:
                fault.hits += 1
        if fault is not None:
            if fault.delay:
                time.sleep(fault.delay)
            if fault.status is None:
                self.close_connection = True
                self.connection.shutdown(2)
                return
            return self._send(record, fault.status, {"error": "injected failure"})
        try:
            status, payload, headers = self._route(method, path, record)
        except _HubError as err:
            status, payload, headers = err.status, {"error": err.message}, err.headers
        self._send(record, status, payload, headers)

    def _send(self, record: Recorded, status: int, payload, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        record.status = status
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _user(self) -> dict:
        auth = self.headers.get("Authorization", "")
        token = auth[len("Bearer "):] if auth.startswith("Bearer ") else None
        user = self.fake.tokens.get(token) if token else None
        if user is None:
            raise _HubError(401, "Invalid credentials in Authorization header",
                            {"X-Error-Message": "Invalid credentials in Authorization header"})
        return user

    def _repo(self, repo_id: str, *, write: bool) -> Repo:
        user = self._user()
        repo = self.fake.repos.get(repo_id)
        if repo is None:
            raise _HubError(404, "Repository not found", {"X-Error-Code": "RepoNotFound"})
        if write and not _can_write(user, repo.owner):
            raise _HubError(403, f"You don't have the rights to write to {repo_id}",
                            {"X-Error-Message": f"You don't have the rights to write to {repo_id}"})
        return repo

    # ---- endpoints -------------------------------------------------------------------------------

    def _route(self, method: str, path: str, record: Recorded):
        hub = self.fake
        if method == "GET" and path == "/api/agent-harnesses":
            return 200, {"standardEnvVars": [], "harnesses": {}}, {}
        if method == "GET" and path == "/api/whoami-v2":
            user = self._user()
            return 200, {"type": "user", "name": user["name"], "orgs": [{"name": o} for o in user.get("orgs", [])],
                         "auth": {"type": "access_token",
                                  "accessToken": {"displayName": "test", "role": user.get("role", "write")}}}, {}
        if method == "POST" and path == "/api/validate-yaml":
            content = json.loads(record.body)["content"]
            match = re.match(r"\A---\n(.*?)\n---\n", content, re.DOTALL)
            try:
                meta = yaml.safe_load(match.group(1)) if match else {}
            except yaml.YAMLError as err:
                return 400, {"errors": [{"message": str(err)}]}, {}
            if not isinstance(meta, dict):
                return 400, {"errors": [{"message": "metadata must be a mapping"}]}, {}
            return 200, {"errors": [], "warnings": []}, {}
        if method == "POST" and path == "/api/repos/create":
            user = self._user()
            payload = json.loads(record.body)
            owner = payload.get("organization") or user["name"]
            repo_id = f"{owner}/{payload['name']}"
            if not _can_write(user, owner):
                message = f'You don\'t have the rights to create a model under the namespace "{owner}"'
                raise _HubError(403, message, {"X-Error-Message": message})
            with hub.lock:
                if repo_id in hub.repos:
                    return 409, {"error": "You already created this model repo", "url": f"{hub.url}/{repo_id}"}, {}
                hub.repos[repo_id] = Repo(owner=owner, private=payload.get("visibility") == "private")
            return 200, {"url": f"{hub.url}/{repo_id}", "name": repo_id}, {}

        match = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/(preupload|commit|branch|revision)/(.+))?", path)
        if not match:
            hub.unhandled.append(f"{method} {path}")
            return 404, {"error": "not implemented by FakeHub"}, {}
        repo_id, action, revision = match.group(1), match.group(2), unquote(match.group(3) or "main")
        if method == "GET" and action in (None, "revision"):
            repo = self._repo(repo_id, write=False)
            branch = repo.branches.get(revision)
            if branch is None:
                raise _HubError(404, "Revision not found", {"X-Error-Code": "RevisionNotFound"})
            sha = repo.commits[-1]["oid"] if repo.commits else "0" * 40
            return 200, {"id": repo_id, "sha": sha, "private": repo.private,
                         "siblings": [{"rfilename": name} for name in sorted(branch)]}, {}
        if method == "POST" and action == "branch":
            repo = self._repo(repo_id, write=True)
            with hub.lock:
                if revision in repo.branches:
                    return 409, {"error": "Branch already exists"}, {}
                repo.branches[revision] = dict(repo.branches["main"])
            return 200, {}, {}
        if method == "POST" and action == "preupload":
            repo = self._repo(repo_id, write=True)
            existing = repo.branches.get(revision, {})
            files = json.loads(record.body)["files"]
            return 200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                                    "oid": git_blob_sha1(existing[f["path"]]) if f["path"] in existing else None}
                                   for f in files]}, {}
        if method == "POST" and action == "commit":
            repo = self._repo(repo_id, write=True)
            return self._commit(repo_id, repo, revision, record.body)
        hub.unhandled.append(f"{method} {path}")
        return 404, {"error": "not implemented by FakeHub"}, {}

    def _commit(self, repo_id: str, repo: Repo, revision: str, body: bytes):
        hub = self.fake
        if revision not in repo.branches:
            raise _HubError(404, "Revision not found", {"X-Error-Code": "RevisionNotFound"})
        header, added, deleted = None, {}, []
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            if item["key"] == "header":
                header = item["value"]
            elif item["key"] == "file":
                value = item["value"]
                if value.get("encoding") != "base64":
                    return 400, {"error": f"unexpected encoding {value.get('encoding')}"}, {}
                added[value["path"]] = base64.b64decode(value["content"])
            elif item["key"] in ("deletedFile", "deletedFolder"):
                deleted.append(item["value"]["path"])
            else:
                return 400, {"error": f"FakeHub takes regular files only, got {item['key']}"}, {}
        if header is None:
            return 400, {"error": "missing header line"}, {}
        with hub.lock:
            files = repo.branches[revision]
            for path in deleted:
                files.pop(path, None)
            files.update(added)
            oid = hashlib.sha1(f"{repo_id}:{revision}:{len(repo.commits)}".encode()).hexdigest()
            repo.commits.append({"oid": oid, "revision": revision, "summary": header.get("summary"),
                                 "files": sorted(added)})
        return 200, {"commitUrl": f"{hub.url}/{repo_id}/commit/{oid}", "commitOid": oid, "success": True}, {}


class _HubError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def _can_write(user: dict, owner: str) -> bool:
    return owner == user["name"] or owner in user.get("orgs", [])
