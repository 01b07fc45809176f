"""Run the compiled-core tests against a build with AddressSanitizer and UBSan.

    LD_PRELOAD=<asan runtime> ASAN_OPTIONS=detect_leaks=0 PYTHONMALLOC=malloc \\
        python tests/fuzz/asan_pytest.py MODULE_PATH [pytest args]

``run.sh --pytest`` does all of it. ``PYTHONMALLOC=malloc`` makes every Python
object its own malloc block, so ASan sees reads past a bytes object.
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from build_asan import ROOT, load_instrumented  # noqa: E402


def main() -> int:
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    load_instrumented(sys.argv[1])
    import pytest

    args = ["-x", "-q", "-p", "no:cacheprovider", os.path.join(ROOT, "tests", "test_ccore.py")]
    return int(pytest.main(args + sys.argv[2:]))


if __name__ == "__main__":
    sys.exit(main())
