# Type stub for the cffi extension built from _speedups.c (see _ccore_build.py).
from typing import Any

ffi: Any
lib: Any
