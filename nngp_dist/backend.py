"""Array namespaces: the only module that imports CuPy.

The kernel mathematics calls ``xp = namespace(*arrays)`` and uses ``xp`` for every array
operation, so one implementation serves NumPy on CPUs and CuPy on GPUs. A CuPy array is moved to
host memory only where it is written to the store (:func:`to_host`).
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np

__all__ = ["cupy_available", "erf", "namespace", "to_host"]


def _cupy() -> ModuleType | None:
    try:
        import cupy
    except Exception:  # ImportError, or a CUDA runtime that fails to load
        return None
    return cupy


def cupy_available() -> bool:
    """True when CuPy imports and sees at least one GPU."""
    cp = _cupy()
    if cp is None:
        return False
    try:
        return cp.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def namespace(*arrays: Any) -> ModuleType:
    """Return the array module (numpy or cupy) shared by ``arrays``.

    Python scalars are ignored. A mixture of NumPy and CuPy arrays is a TypeError: moving data
    between host and device must be explicit.

    Examples
    --------
    >>> import numpy as np
    >>> namespace(np.ones(3), 2.0) is np
    True
    """
    found: set[str] = set()
    for a in arrays:
        if a is None or isinstance(a, (int, float, complex, np.generic)):
            continue
        mod = type(a).__module__.split(".")[0]
        found.add("cupy" if mod == "cupy" else "numpy")
    if found == {"cupy"}:
        cp = _cupy()
        assert cp is not None
        return cp
    if "cupy" in found:
        raise TypeError("arrays mix NumPy and CuPy; move them to one device first")
    return np


def to_host(a: Any) -> np.ndarray:
    """Return ``a`` as a NumPy array (copying from the GPU when it is a CuPy array)."""
    if type(a).__module__.split(".")[0] == "cupy":
        return a.get()
    return np.asarray(a)


def erf(x: Any) -> Any:
    """The error function of ``x`` in its own namespace (SciPy or CuPy's scipy.special)."""
    if namespace(x) is np:
        from scipy.special import erf as _erf
    else:
        from cupyx.scipy.special import erf as _erf
    return _erf(x)
