"""av2ts_cli/download.py (`av2ts download`): with HF_HUB_OFFLINE=1 and empty caches every name fails in one line that
names its repository (or URL, or Google Drive file id) and says it needs a network; unknown names are a usage error;
a cached VGGish file is reported where it is. (Fetching a COMBO checkpoint from a cache and converting it once, and an
AVSegFormer file from a stand-in for Google Drive: tests/test_weights_resolve.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import one_line

REPO = Path(__file__).resolve().parent.parent


def _download(tmp_path, *names: str, **env) -> subprocess.CompletedProcess:
    environ = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HOME": str(tmp_path / "home"),
               "AV2TS_CACHE": str(tmp_path / "av2ts"), "HF_HUB_OFFLINE": "1", **env}
    return subprocess.run([sys.executable, "-m", "av2ts_cli", "download", *names], env=environ, capture_output=True,
                          text=True, timeout=120, cwd=REPO)


@pytest.mark.parametrize(("name", "names"), [
    ("combo-pvt-s4", ["hf://YannQi/COMBO-AVS-checkpoints@main", "HF_HUB_OFFLINE is set", "needs a network"]),
    ("combo-r50-s4", ["hf://YannQi/COMBO-AVS-checkpoints@main", "not in the Hugging Face cache"]),
    ("ced-mini", ["hf://mispeech/ced-mini", "HF_HUB_OFFLINE is set", "fetch it once online"]),
    ("vggish", ["https://github.com/harritaylor/torchvggish/", "HF_HUB_OFFLINE is set", "needs a network"]),
    ("sam-vit-base", ["facebook/sam-vit-base", "HF_HUB_OFFLINE is set", "prefetch it once online"]),
    ("avsegformer-r50-ms3", ["Google Drive file 1MRk5gQnUtiWwYDpPfB20fO07SVLhfuIV", "HF_HUB_OFFLINE is set",
                             "av2ts convert FILE --kind avsegformer --subset ms3 --out DIR"]),
])
def test_offline_and_missing_is_one_line_naming_the_source(tmp_path, name, names):
    proc = _download(tmp_path, name)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    line = one_line(proc.stdout + proc.stderr)
    assert line.startswith("error: ") and "Traceback" not in proc.stderr
    for fragment in names:
        assert fragment in line, (fragment, line)


def test_unknown_names_are_a_usage_error_listing_the_known_ones(tmp_path):
    proc = _download(tmp_path, "combo-r50-avss")
    assert proc.returncode == 2
    line = one_line(proc.stdout + proc.stderr)
    assert "unknown name(s) combo-r50-avss" in line and "combo-pvt-s4" in line and "vggish" in line
    assert all(f"avsegformer-{b}-{s}" in line for b in ("pvt", "r50") for s in ("s4", "ms3", "avss"))
    assert line.endswith("(`av2ts models` describes them)")


def test_a_cached_vggish_is_reported_where_it_is_offline(tmp_path):
    cached = tmp_path / "av2ts" / "downloads" / "vggish-10086976.pth"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"weights")
    proc = _download(tmp_path, "vggish", "--json")
    assert proc.returncode == 0, proc.stderr
    (result,) = json.loads(proc.stdout)["downloads"]
    assert result["path"] == str(cached) and not result["fetched"] and "--kind vggish" in result["use"]
    shown = _download(tmp_path, "vggish")
    text = shown.stdout + shown.stderr  # the console writes its lines to stderr, the JSON goes to stdout
    assert "vggish: already in the cache" in text and str(cached) in text
