"""The restricted numpy-only unpickler (``av2ts_cli.safe_pickle``): what it rebuilds, what it refuses, and that a
refused pickle runs nothing."""

from __future__ import annotations

import collections
import datetime
import io
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from av2ts_cli.errors import CheckpointError
from av2ts_cli.safe_pickle import NUMPY_PICKLE_GLOBALS, NumpyOnlyUnpickler, read_numpy_pickle


class _RunsACommand:
    """A pickle payload that would run a shell command when loaded by a plain unpickler."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_dicts_of_arrays_scalars_and_ordered_dicts_come_back_equal(tmp_path, protocol):
    obj = {"model": collections.OrderedDict(w=np.arange(6, dtype=np.float32).reshape(2, 3), b=np.float64(2.5),
                                            i=np.arange(3)), "__author__": "x", "n": [1, 2.0, None]}
    path = tmp_path / f"p{protocol}.pkl"
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    loaded = read_numpy_pickle(path)
    assert np.array_equal(loaded["model"]["w"], obj["model"]["w"]) and loaded["model"]["w"].dtype == np.float32
    assert loaded["model"]["b"] == 2.5 and loaded["model"]["i"].dtype == obj["model"]["i"].dtype
    assert isinstance(loaded["model"], collections.OrderedDict)
    assert loaded["__author__"] == "x" and loaded["n"] == [1, 2.0, None]


def test_a_pickle_that_would_run_code_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"model": {"w": _RunsACommand(marker)}}))
    with pytest.raises(CheckpointError) as info:
        read_numpy_pickle(path)
    assert info.value.message == (f"{path}: refusing to unpickle the global {os.system.__module__}.system: only plain "
                                  "dicts of numpy arrays are accepted from .pkl files")
    assert not marker.exists()


def test_other_globals_persistent_ids_and_broken_files_are_one_line_errors(tmp_path):
    path = tmp_path / "date.pkl"
    path.write_bytes(pickle.dumps({"when": datetime.date(2024, 1, 1)}))
    with pytest.raises(CheckpointError, match="date.pkl: refusing to unpickle the global datetime.date"):
        read_numpy_pickle(path)

    class WithIds(pickle.Pickler):
        def persistent_id(self, obj):
            return "storage" if isinstance(obj, bytes) else None

    buffer = io.BytesIO()
    WithIds(buffer, protocol=2).dump({"w": b"raw"})
    path = tmp_path / "ids.pkl"
    path.write_bytes(buffer.getvalue())
    with pytest.raises(CheckpointError, match="refusing a pickle with persistent ids"):
        read_numpy_pickle(path)

    path = tmp_path / "cut.pkl"
    path.write_bytes(pickle.dumps({"w": np.zeros(100)})[:50])
    with pytest.raises(CheckpointError, match=r"cut.pkl: unreadable pickle: (EOFError|UnpicklingError)"):
        read_numpy_pickle(path)
    with pytest.raises(CheckpointError, match="unreadable pickle: FileNotFoundError"):
        read_numpy_pickle(tmp_path / "absent.pkl")


def test_the_allowed_globals_are_numpy_array_rebuilding_only():
    modules = {module for module, _ in NUMPY_PICKLE_GLOBALS}
    assert modules <= {"numpy", "numpy.core.multiarray", "numpy._core.multiarray", "numpy.core.numeric",
                       "numpy._core.numeric", "_codecs", "collections"}
    # a subclass widens the table for its own format and keeps refusing the rest (as data/audio.py does)

    class AlsoComplex(NumpyOnlyUnpickler):
        def find_class(self, module, name):
            return complex if (module, name) == ("builtins", "complex") else super().find_class(module, name)

    data = pickle.dumps({"z": complex(1, 2), "a": np.ones(2)})
    loaded = AlsoComplex(io.BytesIO(data), Path("z.pkl")).load()
    assert loaded["z"] == complex(1, 2) and np.array_equal(loaded["a"], np.ones(2))
    with pytest.raises(CheckpointError, match="z.pkl: refusing to unpickle the global datetime.date"):
        AlsoComplex(io.BytesIO(pickle.dumps({"d": datetime.date(2024, 1, 1)})), Path("z.pkl")).load()
