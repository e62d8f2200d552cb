"""hosl: hybrid-order split learning. A zeroth-order (forward-only) edge client trains the first
blocks of a language model; a first-order server trains the rest.

Public API so far: hosl.noise (the seeded noise primitive), hosl.FlatParams, the cut
(hosl.split_model, hosl.load_client, hosl.load_server, hosl.split_summary, hosl.Activation) and
hosl.boundary (frames and the boundary buffer).
"""

import importlib.machinery
import importlib.util
import os
import pkgutil
import sys

# Run from a source checkout (`python -m hosl...` in the repo root puts the checkout first on
# sys.path), this package is the source tree, which has neither the compiled hosl._C nor
# hosl.kernels (its source lives in kernels/). Extending the package path with every other `hosl`
# directory on sys.path lets those submodules come from the installed copy.
__path__ = pkgutil.extend_path(__path__, __name__)


def _map_source_kernels() -> None:
    """hosl.kernels is the repository's top-level kernels/ folder, which has no __init__.py: in the
    repository root it is then a namespace portion that the PyPI package `kernels` (which
    transformers imports) wins over, where a regular package would shadow it. A wheel installs the
    folder as hosl/kernels/. An editable install's finder does not map a namespace subpackage
    (pypa/setuptools#4943), so when nothing else provides hosl.kernels and the source tree's
    kernels/ sits beside this package, it is mapped here."""
    if importlib.util.find_spec(__name__ + ".kernels") is not None:
        return
    source = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels")
    if not os.path.isfile(os.path.join(source, "noise.py")):
        return
    spec = importlib.machinery.ModuleSpec(__name__ + ".kernels", None, is_package=True)
    spec.submodule_search_locations = [source]
    sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    globals()["kernels"] = sys.modules[spec.name]  # as an import would bind it on the parent


_map_source_kernels()

__version__ = "0.1.0"

from hosl import noise  # noqa: E402
from hosl.flat import FlatParams  # noqa: E402
from hosl.loading import load_client, load_server  # noqa: E402
from hosl.split import Activation, split_model, split_summary  # noqa: E402

__all__ = [
    "Activation",
    "FlatParams",
    "load_client",
    "load_server",
    "noise",
    "split_model",
    "split_summary",
    "__version__",
]
