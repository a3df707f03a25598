"""av2ts models (av2ts_cli/weights/zoo.py): every registry name with its fields, and whether it is in the caches
here: a local cache the test builds (a Google Drive download with its checksum record and its converted checkpoint,
a Hub snapshot of a ready repository), nothing fetched."""

from __future__ import annotations

import json

import pytest
from conftest import invoke_cli

from av2ts_cli.weights import registry, upstream, zoo

pytestmark = pytest.mark.slow  # the parameter counts of seven full-size architectures, once (about 15-35 s)

FIELDS = {"name", "description", "family", "preset", "backbone", "subset", "published", "parameters", "size_bytes",
          "licence", "source", "cached", "where"}


@pytest.fixture(scope="module")
def counted(tmp_path_factory) -> str:
    """The parameter counts of the registry's architectures, counted once for the module (on the meta device)."""
    folder = tmp_path_factory.mktemp("counts")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AV2TS_CACHE", str(folder))
        zoo.list_models()
    return (folder / zoo.PARAMETERS_FILE).read_text()


@pytest.fixture()
def caches(tmp_path, monkeypatch, counted):
    """Caches of this test's own (av2ts's and Hugging Face's), empty but for the parameter counts."""
    from huggingface_hub import constants

    monkeypatch.setenv("AV2TS_CACHE", str(tmp_path / "av2ts"))
    (tmp_path / "av2ts").mkdir()
    (tmp_path / "av2ts" / zoo.PARAMETERS_FILE).write_text(counted)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    return tmp_path


def test_every_registry_entry_is_listed_with_its_fields(caches):
    listing = json.loads(invoke_cli(["models", "--json"]).stdout)["models"]
    assert [m["name"] for m in listing] == list(registry.REGISTRY)
    for model in listing:
        assert set(model) == FIELDS, model["name"]
    by_name = {m["name"]: m for m in listing}
    vct = by_name["vct-avss"]
    assert (vct["family"], vct["backbone"], vct["subset"]) == ("vct", "Swin-B-384", "avss")
    assert vct["licence"] == "apache-2.0"
    assert vct["published"] == {"J": 52.5, "F": 56.9, "protocol": "av2ts"} and vct["parameters"] == 222_238_549
    assert by_name["avsegformer-pvt-s4"]["published"]["protocol"] == "avsegformer"
    assert by_name["avsegformer-r50-ms3"]["parameters"] == 126_737_216
    assert by_name["demo"]["cached"] and by_name["demo"]["parameters"] == 2_644_419
    assert not any(m["cached"] for m in listing if m["name"] != "demo")  # empty caches: nothing else is here


def test_a_converted_download_in_the_cache_is_listed_as_cached_where_it_is(caches):
    entry = registry.REGISTRY["avsegformer-r50-ms3"]
    folder = caches / "av2ts" / upstream.DOWNLOADS_DIR / upstream.GDRIVE_DIR
    folder.mkdir(parents=True)
    (folder / f"{entry.gdrive_id}.pth").write_bytes(b"x" * 1234)
    sha256 = "ab" * 32
    (folder / f"{entry.gdrive_id}.pth.sha256").write_text(sha256 + "\n")
    assert zoo.cache_state(entry) == (None, 1234)  # downloaded, not converted yet: not ready
    converted = upstream.converted_folder(sha256, entry.convert_kind)
    converted.mkdir(parents=True)
    for name in ("model.safetensors", "config.json"):
        (converted / name).write_text("{}")
    (listed,) = [m for m in zoo.list_models() if m["name"] == "avsegformer-r50-ms3"]
    assert listed["cached"] and listed["where"] == str(converted) and listed["size_bytes"] == 1234


def test_a_ready_hub_repository_in_the_cache_is_listed_as_cached(caches):
    snapshot = caches / "hf" / "models--mispeech--ced-mini" / "snapshots" / ("c" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").write_bytes(b"")
    refs = caches / "hf" / "models--mispeech--ced-mini" / "refs"
    refs.mkdir()
    (refs / "main").write_text("c" * 40)
    where, _ = zoo.cache_state(registry.REGISTRY["ced-mini"])
    assert where == snapshot
