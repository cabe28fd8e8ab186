"""torch_fwd: forward-mode automatic differentiation for PyTorch.

One table of forward rules serves a graph pass over captured ATen graphs and an eager
``Dual`` tensor for code that cannot be captured; K tangents travel together as a leading
chunk dimension. See docs/design.md.
"""
import os as _os

# rules/ and triton_kernels/ sit beside this folder (docs/design.md); setup.py maps them in
# as subpackages. A source checkout imported straight from the repository root (as
# `python -m benchmarks` does, the root being first on sys.path) finds them here instead.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_root, "rules", "__init__.py")) and not _os.path.isdir(
        _os.path.join(_os.path.dirname(_os.path.abspath(__file__)), "rules")):
    __path__.append(_root)

from .registry import NoRuleError, frule, register_frule, unregister_frule
from .dual import Dual
from .api import jvp, jacfwd, make_jvp_graph, explain, pick_chunk_size
from .linearize import linearize
from .hvp import hvp
from .laplacian import laplacian
from .module import JVP
from . import rules  # noqa: F401  (fills the rule table)
from . import testing  # noqa: F401

__all__ = ["jvp", "jacfwd", "linearize", "hvp", "laplacian", "JVP", "make_jvp_graph", "frule", "register_frule", "unregister_frule", "Dual",
           "NoRuleError", "explain", "pick_chunk_size", "testing"]
__version__ = "0.1.0"
