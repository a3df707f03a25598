"""hf:// references (av2ts_cli/hub.py): the Hugging Face Hub without a network fails within seconds with the hint
that fits the situation, and a cached copy is still used.

Every case runs against this machine only (no test reaches the internet): a closed loopback port (connection
refused), a black-holed listener (its SYNs dropped), a local HTTP server answering as the Hub does for missing
repositories, revisions and files (and serving files), HF_HUB_OFFLINE=1, and a hand-written cache.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _hub import black_hole, closed_port, local_hub, write_cached_repo
from conftest import one_line, tiny_cfg

from av2ts_cli.model import build_model
from av2ts_cli.weights import checkpoint

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def siam_checkpoint(tmp_path_factory) -> Path:
    """A random av2ts-tiny S4 checkpoint with the Siam encoder. Read-only."""
    torch.manual_seed(0)
    cfg = tiny_cfg()
    return checkpoint.save_checkpoint(build_model(cfg), cfg, tmp_path_factory.mktemp("ckpt") / "tiny")


# -------------------------------------------------------------------------------------------- hub, no network
def _av2ts(args: list[str], **env: str) -> tuple[subprocess.CompletedProcess, float]:
    """``av2ts ARGS`` in a fresh interpreter (huggingface_hub reads its environment at import), and its seconds."""
    full = {**os.environ, **env}
    for name in ("HF_HUB_OFFLINE", "HF_HUB_ETAG_TIMEOUT", "HF_HUB_DOWNLOAD_TIMEOUT", "HF_ENDPOINT"):
        if name not in env:
            full.pop(name, None)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "av2ts_cli", *args], env=full, capture_output=True, text=True,
                          timeout=120, cwd=REPO)
    return proc, time.perf_counter() - start


def _cache_env(tmp_path: Path) -> dict[str, str]:
    return {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HOME": str(tmp_path / "home")}


def _no_downloads(cache: Path) -> None:
    """Nothing downloaded, nothing half-written in the cache."""
    left = [p for p in cache.rglob("*") if p.is_file() and not p.name.endswith(".lock") and p.name != "CACHEDIR.TAG"]
    assert left == [], left


MISSING = "config.json (revision main) is not in the Hugging Face cache"
FETCH = "`hf download own/rep config.json --revision main`"


def test_a_refused_connection_fails_within_seconds_naming_no_network(tmp_path):
    endpoint = f"http://127.0.0.1:{closed_port()}"
    proc, seconds = _av2ts(["info", "--model", "hf://own/rep"], HF_ENDPOINT=endpoint, **_cache_env(tmp_path))
    assert proc.returncode == 1 and seconds < 10, (seconds, proc.stderr)  # was 24 s of huggingface_hub retries
    assert one_line(proc.stderr) == (
        f"error: hf://own/rep: {MISSING} {tmp_path / 'hub'} and the Hub could not be reached (no network? "
        f"{endpoint}: the connection was refused); connect and retry, or fetch it on a machine with a network "
        f"({FETCH}) into the cache this one reads (HF_HUB_CACHE)")
    assert "Retrying" not in proc.stderr
    _no_downloads(tmp_path / "hub")


def test_a_black_holed_endpoint_fails_within_seconds(tmp_path):
    """Every SYN dropped (a listener whose accept queue is full, on this machine): the probe's bound, 4 s."""
    with black_hole() as endpoint:
        proc, seconds = _av2ts(["info", "--model", "hf://own/rep"], HF_ENDPOINT=endpoint, **_cache_env(tmp_path))
    assert proc.returncode == 1 and seconds < 10, (seconds, proc.stderr)
    line = one_line(proc.stderr)
    assert line.startswith(f"error: hf://own/rep: {MISSING} {tmp_path / 'hub'} and the Hub could not be reached "
                           f"(no network? {endpoint}: no answer within 4 s (HF_HUB_ETAG_TIMEOUT sets this bound))")
    assert line.endswith(f"({FETCH}) into the cache this one reads (HF_HUB_CACHE)")
    _no_downloads(tmp_path / "hub")


def test_offline_mode_says_so(tmp_path):
    proc, seconds = _av2ts(["info", "--model", "hf://own/rep"], HF_HUB_OFFLINE="1", **_cache_env(tmp_path))
    assert proc.returncode == 1 and seconds < 10
    assert one_line(proc.stderr) == (
        f"error: hf://own/rep: {MISSING} {tmp_path / 'hub'} and HF_HUB_OFFLINE is set (offline mode: only the "
        f"cache is read); unset HF_HUB_OFFLINE to download it, or fetch it once online with {FETCH}")


@pytest.mark.parametrize(("ref", "reason"), [
    ("hf://own/absent", "repository not found on the Hugging Face Hub (or private/gated: log in with "
                        "`hf auth login`)"),
    ("hf://own/norev@v9", "revision 'v9' not found in the repository"),
    ("hf://own/nofile", "config.json not found in the repository at revision main"),
])
def test_missing_repository_revision_or_file_on_a_reachable_hub(tmp_path, ref, reason):
    with local_hub() as endpoint:
        proc, seconds = _av2ts(["info", "--model", ref], HF_ENDPOINT=endpoint, **_cache_env(tmp_path))
    assert proc.returncode == 1 and seconds < 10, (seconds, proc.stderr)
    assert one_line(proc.stderr) == f"error: {ref}: {reason}"
    _no_downloads(tmp_path / "hub")


RESOLVE = ("import sys\nfrom av2ts_cli.weights import checkpoint\n"
           "found = checkpoint.find_checkpoint(sys.argv[1])\nprint(found.config)\nprint(found.weights)\n")


def _resolve(ref: str, **env: str) -> tuple[subprocess.CompletedProcess, float]:
    full = {**os.environ, **env}
    for name in ("HF_HUB_OFFLINE", "HF_ENDPOINT", "HF_HUB_ETAG_TIMEOUT"):
        if name not in env:
            full.pop(name, None)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", RESOLVE, ref], env=full, capture_output=True, text=True,
                          timeout=120, cwd=REPO)
    return proc, time.perf_counter() - start


def test_without_a_network_a_cached_checkpoint_is_used(siam_checkpoint, tmp_path):
    files = {name: siam_checkpoint / name for name in ("config.json", "model.safetensors")}
    write_cached_repo(tmp_path / "hub", "own/rep", {"d" * 40: files}, {"main": "d" * 40})
    with black_hole() as endpoint:
        proc, seconds = _resolve("hf://own/rep", HF_ENDPOINT=endpoint, **_cache_env(tmp_path))
    # one 4 s probe for both files (the verdict is remembered): under the 8 s that probing each file would take
    assert proc.returncode == 0 and seconds < 8, (seconds, proc.stderr)
    config, weights_file = proc.stdout.split()
    assert Path(config).read_bytes() == files["config.json"].read_bytes()
    assert Path(weights_file).read_bytes() == files["model.safetensors"].read_bytes()


def test_a_reachable_hub_still_downloads(siam_checkpoint, tmp_path):
    """The probe lets a working endpoint through: both files come from the local hub into the cache."""
    served = {f"own/rep/{n}": (siam_checkpoint / n).read_bytes() for n in ("config.json", "model.safetensors")}
    with local_hub(served) as endpoint:
        proc, seconds = _resolve("hf://own/rep", HF_ENDPOINT=endpoint, HF_HUB_DISABLE_XET="1", **_cache_env(tmp_path))
    assert proc.returncode == 0, proc.stderr
    config, weights_file = proc.stdout.split()
    assert Path(config).is_relative_to(tmp_path / "hub")
    assert Path(weights_file).read_bytes() == served["own/rep/model.safetensors"]
