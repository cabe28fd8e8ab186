"""Library frules, one module per op family. Importing this package fills the table.

Each module also lists ``TEST_CASES``: functions and inputs that exercise its rules,
checked by ``tests/test_rules.py`` through ``torch_fwd.testing.check_frule``.
"""
from . import elementwise, special, reductions, views, indexing, linalg, nn, random, custom, collectives  # noqa: F401

FAMILIES = (elementwise, special, reductions, views, indexing, linalg, nn, random, custom, collectives)
