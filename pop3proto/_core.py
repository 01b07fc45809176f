"""Backend selection for the hot loops: the compiled core when it is built and
allowed, the pure-Python twin otherwise.

``POP3PROTO_PUREPYTHON=1`` in the environment forces the pure path at import.
Both backends expose the same functions with byte-identical results; see
``_purecore`` for their contracts.
"""

from __future__ import annotations

import os

from . import _purecore
from ._purecore import LINE_START, SKIP_LF, ListingError, stuff_end

__all__ = [
    "BACKEND",
    "LINE_START",
    "SKIP_LF",
    "ListingError",
    "parse_listing",
    "stuff",
    "stuff_end",
    "unstuff",
]

unstuff = _purecore.unstuff
stuff = _purecore.stuff
parse_listing = _purecore.parse_listing
BACKEND = "python"

if not os.environ.get("POP3PROTO_PUREPYTHON"):
    try:
        from . import _ccore
    except ImportError:  # not compiled (no compiler at install time)
        pass
    else:
        unstuff = _ccore.unstuff
        stuff = _ccore.stuff
        parse_listing = _ccore.parse_listing
        BACKEND = "cffi"
