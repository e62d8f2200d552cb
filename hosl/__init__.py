"""hosl: hybrid-order split learning. A zeroth-order (forward-only) edge client trains the first
blocks of a language model; a first-order server trains the rest.

Public API so far: hosl.noise (the seeded noise primitive), hosl.FlatParams, the cut
(hosl.split_model, hosl.load_client, hosl.load_server, hosl.split_summary, hosl.Activation) and
hosl.boundary (frames and the boundary buffer).
"""

import pkgutil

# Run from a source checkout (`python -m hosl...` in the repo root puts the checkout first on
# sys.path), this package is the source tree, which has neither the compiled hosl._C nor
# hosl.kernels (its source lives in kernels/). Extending the package path with every other `hosl`
# directory on sys.path lets those submodules come from the installed copy.
__path__ = pkgutil.extend_path(__path__, __name__)

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
