"""Reading detectron2 ``.pkl`` weight files without running code from them.

A pickle can name any importable callable (``os.system``, ``subprocess.Popen``...) and have it called
while loading. Model-zoo files only ever need numpy arrays inside plain containers, so the unpickler
here resolves only those globals and refuses every other one before it is imported, naming it.
The files are read with ``encoding="latin1"``, as detectron2 does, so that arrays pickled under
Python 2 (bytes stored as ``str``) load too.
"""

from __future__ import annotations

import builtins
import collections
import os
import pickle
from typing import Any

import numpy as np

from maskformer.checkpoint import CheckpointError

__all__ = ["UnsafePickleError", "RestrictedUnpickler", "load_pickle", "ALLOWED_GLOBALS"]


class UnsafePickleError(CheckpointError):
    """The pickle names a global that is not on the allow list (it was not imported or called)."""


def _numpy_attr(*candidates: str) -> Any:
    """The first of ``module:name`` that exists: numpy 2 moved ``numpy.core`` to ``numpy._core``."""
    import importlib

    for candidate in candidates:
        module_name, name = candidate.split(":")
        try:
            return getattr(importlib.import_module(module_name), name)
        except (ImportError, AttributeError):
            continue
    raise ImportError(f"none of {candidates} exists in numpy {np.__version__}")


def _allowed_globals() -> dict[tuple[str, str], Any]:
    reconstruct = _numpy_attr("numpy._core.multiarray:_reconstruct", "numpy.core.multiarray:_reconstruct")
    scalar = _numpy_attr("numpy._core.multiarray:scalar", "numpy.core.multiarray:scalar")
    frombuffer = _numpy_attr("numpy._core.numeric:_frombuffer", "numpy.core.numeric:_frombuffer")
    import _codecs

    allowed: dict[tuple[str, str], Any] = {}
    # Arrays written by numpy 1.x name numpy.core, by numpy 2.x numpy._core; both map to what is installed,
    # so the deprecated numpy.core alias is never imported.
    for core in ("numpy.core", "numpy._core"):
        allowed[(f"{core}.multiarray", "_reconstruct")] = reconstruct  # ndarray, pickle protocols 0-4
        allowed[(f"{core}.multiarray", "scalar")] = scalar  # numpy scalars (np.float32(1.0), ...)
        allowed[(f"{core}.numeric", "_frombuffer")] = frombuffer  # ndarray, pickle protocol 5
    allowed[("numpy", "ndarray")] = np.ndarray
    allowed[("numpy", "dtype")] = np.dtype
    # Python 3 writes bytes into protocol-2 pickles as _codecs.encode(text, "latin1"); a pure function.
    allowed[("_codecs", "encode")] = _codecs.encode
    allowed[("collections", "OrderedDict")] = collections.OrderedDict
    for name in ("dict", "list", "tuple", "set", "frozenset", "int", "float", "complex", "bool", "str", "bytes"):
        allowed[("builtins", name)] = allowed[("__builtin__", name)] = getattr(builtins, name)  # Python 3 / 2
    return allowed


ALLOWED_GLOBALS: dict[tuple[str, str], Any] = _allowed_globals()


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only :data:`ALLOWED_GLOBALS` (numpy arrays, containers, primitives).

    ``source`` names the file in error messages.
    """

    def __init__(self, file, *, source: str = "<pickle>", encoding: str = "latin1"):
        super().__init__(file, encoding=encoding)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"{self.source}: refusing to load: the pickle references the global '{module}.{name}', which is "
                "not a numpy array or plain container (a weights file never needs it; it may be malicious). "
                "Only numpy arrays, dicts, lists, tuples, primitives and collections.OrderedDict are allowed"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"{self.source}: refusing to load: the pickle uses persistent ids ({pid!r}); "
                                "torch files must be read with torch.load(weights_only=True) instead")


def load_pickle(path: str | os.PathLike) -> Any:
    """Unpickle ``path`` with :class:`RestrictedUnpickler` (``encoding="latin1"``)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    with open(path, "rb") as f:
        try:
            return RestrictedUnpickler(f, source=path).load()
        except UnsafePickleError:
            raise
        except Exception as error:  # truncated or not a pickle at all: pickle raises many types
            raise CheckpointError(f"{path}: cannot unpickle ({type(error).__name__}: {error})") from None
