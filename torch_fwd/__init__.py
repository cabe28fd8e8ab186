"""torch_fwd: forward-mode automatic differentiation for PyTorch.

One table of forward rules serves a graph pass over captured ATen graphs and an eager
``Dual`` tensor for code that cannot be captured; K tangents travel together as a leading
chunk dimension. See docs/design.md.
"""
from .registry import NoRuleError, frule, register_frule, unregister_frule
from .dual import Dual
from .api import jvp, jacfwd, make_jvp_graph, explain, pick_chunk_size
from . import rules  # noqa: F401  (fills the rule table)
from . import testing  # noqa: F401

__all__ = ["jvp", "jacfwd", "make_jvp_graph", "frule", "register_frule", "unregister_frule", "Dual",
           "NoRuleError", "explain", "pick_chunk_size", "testing"]
__version__ = "0.1.0"
