"""Hugging Face Hub stand-ins for the tests, all on this machine (no traffic leaves it): the cache layout written
by hand, a local HTTP server that answers as the Hub does for missing repositories, revisions and files, and a
black-holed endpoint (a listener whose accept queue is full, so that the kernel drops every further SYN)."""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path


def write_cached_repo(cache: Path, repo_id: str, commits: dict[str, dict[str, Path]], refs: dict[str, str]) -> None:
    """The huggingface_hub cache layout, written by hand: blobs named by content hash, snapshots of symlinks."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    for commit, files in commits.items():
        for name, source in files.items():
            data = source.read_bytes()
            blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
            blob.parent.mkdir(parents=True, exist_ok=True)
            blob.write_bytes(data)
            link = repo / "snapshots" / commit / name
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(blob, link.parent))
    for ref, commit in refs.items():
        (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)


def cached_hub_env(tmp_path: Path, cache: Path) -> dict[str, str]:
    """The environment of a process that finds the Hub only in ``cache``: the endpoint is a closed port (a call
    that reaches for the network fails within 2 s), av2ts's own cache is ``tmp_path/av2ts-cache``."""
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "home"),
           "AV2TS_CACHE": str(tmp_path / "av2ts-cache"), "HF_ENDPOINT": "http://127.0.0.1:9",
           "HF_HUB_ETAG_TIMEOUT": "2", "HF_HUB_DOWNLOAD_TIMEOUT": "2"}
    env.pop("HF_HUB_OFFLINE", None)
    return env


def run_json_script(script: str, env: dict[str, str], cwd: Path) -> dict:
    """Run ``python -c script`` in a fresh process (nothing cached in this one leaks in) and return the JSON object
    its last line of stdout prints; the process must succeed."""
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600,
                          cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released): a connection to it is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def black_hole() -> Iterator[str]:
    """An endpoint URL whose connections hang: a listener with a backlog of 0 that never accepts, its one queue
    slot taken, so the kernel drops the SYNs of every later connection (as a firewall that drops packets does)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    filler = socket.create_connection(server.getsockname(), timeout=2)
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}"
    finally:
        filler.close()
        server.close()


HUB_COMMIT = "c" * 40  # the one commit of every repository the local hub serves


class _HubHandler(http.server.BaseHTTPRequestHandler):
    """The Hub's answers, for /<owner>/<repo>/resolve/<rev>/<file>: the repository names ``absent``, ``norev`` and
    ``nofile`` get 404 with the Hub's X-Error-Code header (RepoNotFound, RevisionNotFound, EntryNotFound); a file of
    ``self.server.files`` ({"owner/repo/file": bytes}) is served with the headers huggingface_hub reads (ETag,
    X-Repo-Commit, Content-Length); anything else (the root, a probe) is an empty 200."""

    def _answer(self, body: bool) -> None:
        parts = self.path.lstrip("/").split("/")
        repo = parts[1] if len(parts) > 1 else ""
        code = {"absent": "RepoNotFound", "norev": "RevisionNotFound", "nofile": "EntryNotFound"}.get(repo)
        data = b""
        if len(parts) >= 5 and parts[2] == "resolve":
            data = self.server.files.get("/".join([parts[0], parts[1], *parts[4:]]), b"")
        self.send_response(404 if code else 200)
        if code:
            self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", f"{code} (test hub)")
        if data:
            self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
            self.send_header("X-Repo-Commit", HUB_COMMIT)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def do_GET(self) -> None:
        self._answer(body=True)

    def log_message(self, *args) -> None:  # quiet
        pass


@contextlib.contextmanager
def local_hub(files: dict[str, bytes] | None = None) -> Iterator[str]:
    """A Hub stand-in on a loopback port (see _HubHandler) serving ``files`` ({"owner/repo/path": bytes}); yields
    its URL for HF_ENDPOINT."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _HubHandler)
    server.files = dict(files or {})
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
