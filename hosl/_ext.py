"""Loads the compiled extension hosl._C, and records why when it cannot.

The package imports without it; the features that need it raise ExtensionUnavailableError naming
the reason and the fix.
"""

from __future__ import annotations

try:
    from hosl import _C
except ImportError as exc:  # not built, or built for another Python
    _C = None
    load_error: str | None = f"{type(exc).__name__}: {exc}"
else:
    load_error = None


class ExtensionUnavailableError(RuntimeError):
    """A feature needs hosl._C and it did not load."""


def require(feature: str):
    """The extension module, or ExtensionUnavailableError saying why `feature` cannot run."""
    if _C is None:
        raise ExtensionUnavailableError(
            f"{feature} needs the compiled extension hosl._C, which did not load ({load_error}). "
            "Install hosl with `pip install .` (or `pip install -e .`) on a machine with a C++17 compiler."
        )
    return _C
