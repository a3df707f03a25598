"""The restricted unpickler: rebuilds plain containers and numpy arrays, refuses every other global.

Pickles from outside (detectron2 backbone weights, AVSBench log-mel files) are read only through it, so a
malicious file cannot run code: a global that is not in ``NUMPY_PICKLE_GLOBALS`` is refused before it is imported.
Subclasses widen the table for their own formats (``data/audio.py`` adds pickled torch tensors).

Ground floor: the standard library and ``errors`` (numpy is imported only when a pickle names it).
"""

from __future__ import annotations

import importlib
import os
import pickle
from pathlib import Path

from av2ts_cli.errors import CheckpointError

# Exactly what a pickle of a dict of numpy arrays needs (numpy 1.x names its module numpy.core, 2.x numpy._core;
# _codecs.encode carries the raw bytes of arrays pickled with protocol 2, e.g. by Python 2).
NUMPY_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),  # protocol 5
    ("_codecs", "encode"), ("collections", "OrderedDict"),
}


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Rebuilds dicts, lists, numbers, strings and numpy arrays; any other global is refused before it is touched."""

    def __init__(self, file, path: Path):
        super().__init__(file, encoding="latin1")  # detectron2's own loader uses latin1 for Python-2 pickles
        self.path = path

    def find_class(self, module: str, name: str):
        if (module, name) not in NUMPY_PICKLE_GLOBALS:
            raise CheckpointError(self.path, f"refusing to unpickle the global {module}.{name}: only plain dicts of "
                                             "numpy arrays are accepted from .pkl files")
        if module.startswith("numpy.core."):  # numpy 2 keeps the old path only as a deprecated alias
            try:
                importlib.import_module("numpy._core.multiarray")
                module = module.replace("numpy.core.", "numpy._core.", 1)
            except ImportError:
                pass
        return getattr(importlib.import_module(module), name)

    def persistent_load(self, pid):
        raise CheckpointError(self.path, "refusing a pickle with persistent ids (not a plain dict of numpy arrays)")


def read_numpy_pickle(path: str | os.PathLike):
    """The object of a detectron2-style ``.pkl`` (dicts of numpy arrays), through the restricted unpickler."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return NumpyOnlyUnpickler(f, path).load()
    except CheckpointError:
        raise
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError, IndexError) as err:
        raise CheckpointError(path, f"unreadable pickle: {type(err).__name__}: {err}") from None
