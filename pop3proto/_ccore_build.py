"""cffi build script (API, out-of-line mode) for the compiled core.

Used by ``setup.py`` through ``cffi_modules``; builds the extension module
``pop3proto._cspeedups`` from ``_speedups.c``. ``_ccore`` wraps it.
"""

from __future__ import annotations

import os

from cffi import FFI  # type: ignore[import-untyped,unused-ignore]

HERE = os.path.dirname(os.path.abspath(__file__))

CDEF = """
#define P3_DONE ...
#define P3_AT_LINE_START ...
#define P3_COPIED ...
#define P3_EMPTY ...
#define P3_TERM_SHIFT ...
#define P3_STATE_SHIFT ...
#define P3_STOP_SHIFT ...
#define P3_LEN_SHIFT ...
uint64_t p3_unstuff(const unsigned char *buf, size_t start, size_t end, int at_line_start,
                    char *out, uint64_t *out_len);
uint64_t p3_stuff(const unsigned char *data, size_t n, int state, int dots, char *out);
int p3_parse_listing(const unsigned char *buf, size_t start, size_t end, int numeric,
                     size_t limit, uint64_t *msgs, uint64_t *values, char *uids,
                     uint64_t *res);
int p3_simd_level(int limit);
"""


def make_ffi(
    module_name: str = "pop3proto._cspeedups", absolute: bool = False, **extra: object
) -> FFI:
    """The FFI builder for the compiled core. ``extra`` is passed on to the
    extension (e.g. sanitizer flags for the fuzz build); ``absolute`` names
    the sources by absolute path, as ``FFI.compile`` needs."""
    ffi = FFI()
    ffi.cdef(CDEF)
    # setup.py runs in the project root and setuptools wants relative source
    # paths there; elsewhere only absolute ones work.
    root = os.path.dirname(HERE)
    relative = not absolute and os.path.abspath(os.getcwd()) == root
    src_dir = "pop3proto" if relative else HERE
    ffi.set_source(
        module_name,
        '#include "_speedups.h"',
        sources=[os.path.join(src_dir, "_speedups.c")],
        include_dirs=[src_dir],
        depends=[os.path.join(src_dir, "_speedups.h")],
        # The full C API makes each call about a third cheaper than the
        # limited one (abi3); the calls are short, so that shows.
        py_limited_api=False,
        **extra,
    )
    return ffi


ffibuilder = make_ffi()

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
