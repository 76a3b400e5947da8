"""A small stand-in for the Hugging Face Hub on 127.0.0.1, for driving huggingface_hub's real code without network.

It serves what huggingface_hub 2.x calls for single-file downloads and for commits:
- HEAD/GET /{repo_id}/resolve/{revision}/{filename}: ETag, X-Repo-Commit, Content-Length; *.safetensors are LFS
  files, answered with a 302 to a second origin (the "CDN") carrying X-Linked-Etag (sha256) and X-Linked-Size,
  like the real Hub; errors carry X-Error-Code (RepoNotFound, RevisionNotFound, EntryNotFound);
- POST /api/repos/create, /api/validate-yaml, /api/models/{repo_id}/preupload/{rev} (every file "regular", so
  the commit carries it base64-encoded) and /api/models/{repo_id}/commit/{rev} (NDJSON).
"""
from __future__ import annotations

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    def __init__(self, token: str | None = None):
        self.repos: dict[str, dict] = {}  # repo_id -> {"refs": {branch: commit}, "commits": {commit: {path: bytes}}}
        self.blobs: dict[str, bytes] = {}  # sha256 -> content, served by the CDN origin
        self.requests: list[tuple[str, str, dict]] = []  # (method, path, headers) as received
        self.token = token  # when set, writes need "Authorization: Bearer <token>"
        self._servers: list[ThreadingHTTPServer] = []

    # -- content ---------------------------------------------------------------------------
    def add_commit(self, repo_id: str, files: dict[str, bytes], branch: str = "main") -> str:
        """A new commit on `branch` holding the parent's files updated by `files`; returns its id."""
        repo = self.repos.setdefault(repo_id, {"refs": {}, "commits": {}})
        parent = repo["refs"].get(branch)
        tree = dict(repo["commits"][parent]) if parent else {}
        tree.update(files)
        for content in files.values():
            self.blobs[hashlib.sha256(content).hexdigest()] = content
        commit = hashlib.sha1(json.dumps([parent, sorted((k, git_blob_sha1(v)) for k, v in tree.items())]).encode()).hexdigest()
        repo["commits"][commit] = tree
        repo["refs"][branch] = commit
        return commit

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        repo = self.repos[repo_id]
        return repo["commits"][repo["refs"].get(revision, revision)]

    # -- servers ---------------------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._servers[0].server_address[1]}"

    @property
    def cdn(self) -> str:
        return f"http://127.0.0.1:{self._servers[1].server_address[1]}"

    def start(self) -> "FakeHub":
        for handler in (_hub_handler(self), _cdn_handler(self)):
            server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
            server.daemon_threads = True
            threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
            self._servers.append(server)
        return self

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()

    def __enter__(self) -> "FakeHub":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class _Base(BaseHTTPRequestHandler):
    hub: FakeHub

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def _send(self, status: int, headers: dict | None = None, body: bytes = b"", head: bool = False) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, str(v))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _json(self, status: int, obj, headers: dict | None = None, head: bool = False) -> None:
        self._send(status, {"Content-Type": "application/json", **(headers or {})}, json.dumps(obj).encode(), head)

    def _record(self) -> str:
        path = urlsplit(self.path).path
        self.hub.requests.append((self.command, path, dict(self.headers)))
        return path


def _hub_handler(hub: FakeHub):
    class Hub(_Base):
        def do_HEAD(self):
            self._resolve(head=True)

        def do_GET(self):
            self._resolve(head=False)

        def _resolve(self, head: bool) -> None:
            parts = self._record().strip("/").split("/")
            if len(parts) < 5 or parts[2] != "resolve":
                return self._json(404, {"error": "not found"}, head=head)
            repo_id, revision, filename = f"{parts[0]}/{parts[1]}", unquote(parts[3]), unquote("/".join(parts[4:]))
            repo = hub.repos.get(repo_id)
            if repo is None:
                return self._json(401, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"}, head)
            commit = repo["refs"].get(revision, revision)
            if commit not in repo["commits"]:
                return self._json(404, {"error": "Invalid rev id"}, {"X-Error-Code": "RevisionNotFound"}, head)
            content = repo["commits"][commit].get(filename)
            if content is None:
                return self._json(404, {"error": "Entry not found"},
                                  {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": commit}, head)
            if filename.endswith(".safetensors"):  # an LFS file: redirect to the CDN, metadata on this response
                sha = hashlib.sha256(content).hexdigest()
                return self._send(302, {"Location": f"{hub.cdn}/blobs/{sha}", "X-Repo-Commit": commit,
                                        "X-Linked-Etag": f'"{sha}"', "X-Linked-Size": len(content),
                                        "ETag": f'"{git_blob_sha1(sha.encode())}"'}, b"", head)
            return self._send(200, {"X-Repo-Commit": commit, "ETag": f'"{git_blob_sha1(content)}"',
                                    "Content-Type": "application/octet-stream"}, content, head)

        def do_POST(self):
            path = self._record()
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if hub.token is not None and self.headers.get("Authorization") != f"Bearer {hub.token}":
                return self._json(401, {"error": "Invalid credentials in Authorization header"})
            if path == "/api/validate-yaml":
                return self._json(200, {"errors": [], "warnings": []})
            if path == "/api/repos/create":
                payload = json.loads(body)
                repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
                if repo_id in hub.repos:
                    return self._json(409, {"error": "You already created this model repo", "url": f"{hub.endpoint}/{repo_id}"})
                hub.add_commit(repo_id, {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"})
                hub.repos[repo_id]["create_payload"] = payload
                return self._json(200, {"url": f"{hub.endpoint}/{repo_id}", "name": repo_id})
            parts = path.strip("/").split("/")  # api models org name (preupload|commit) rev
            if len(parts) == 6 and parts[:2] == ["api", "models"]:
                repo_id, action, revision = f"{parts[2]}/{parts[3]}", parts[4], unquote(parts[5])
                if repo_id not in hub.repos:
                    return self._json(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
                if action == "preupload":
                    files = json.loads(body)["files"]
                    return self._json(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                                                       "oid": None} for f in files]})
                if action == "commit":
                    lines = [json.loads(line) for line in body.splitlines() if line.strip()]
                    files = {ln["value"]["path"]: base64.b64decode(ln["value"]["content"]) for ln in lines if ln["key"] == "file"}
                    if any(ln["key"] not in ("header", "file") for ln in lines):
                        return self._json(400, {"error": "this fake Hub takes regular files only"})
                    commit = hub.add_commit(repo_id, files, branch=revision)
                    hub.repos[repo_id].setdefault("messages", []).append(lines[0]["value"]["summary"])
                    return self._json(200, {"commitUrl": f"{hub.endpoint}/{repo_id}/commit/{commit}",
                                            "commitOid": commit, "success": True})
            return self._json(404, {"error": f"no route {path}"})

    Hub.hub = hub
    return Hub


def _cdn_handler(hub: FakeHub):
    class Cdn(_Base):
        def do_GET(self):
            sha = self._record().rsplit("/", 1)[-1]
            if sha not in hub.blobs:
                return self._send(404)
            self._send(200, {"Content-Type": "application/octet-stream"}, hub.blobs[sha])

    Cdn.hub = hub
    return Cdn
