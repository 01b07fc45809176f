"""Build the compiled core with AddressSanitizer and UBSan into a directory.

    python tests/fuzz/build_asan.py OUTDIR [--fuzzer]

Without ``--fuzzer`` it builds with the default C compiler (gcc or clang), for
running the test suite under ASan; ``--fuzzer`` builds with clang and
libFuzzer coverage (``-fsanitize=fuzzer-no-link``) for the atheris harness.
Prints the path of the built module and the sanitizer runtime to preload
(``LD_PRELOAD``) as two lines. The module is named ``pop3proto._cspeedups``
like the normal build; ``load_instrumented`` installs it in its place.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import os
import shutil
import subprocess
import sys
from types import ModuleType

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODULE = "pop3proto._cspeedups"


def runtime_for(cc: str, fuzzer: bool) -> str:
    """The sanitizer runtime a non-instrumented python must preload."""
    if fuzzer:
        import atheris  # type: ignore[import-untyped,import-not-found,unused-ignore]

        return os.path.join(atheris.path(), "asan_with_fuzzer.so")
    name = "libclang_rt.asan-x86_64.so" if "clang" in cc else "libasan.so"
    out = subprocess.run([cc, f"-print-file-name={name}"], capture_output=True, text=True)
    path = out.stdout.strip()
    if not os.path.isabs(path) or not os.path.exists(path):
        raise SystemExit(f"cannot find the ASan runtime of {cc} ({name})")
    return path


def build(outdir: str, fuzzer: bool) -> tuple[str, str]:
    sys.path.insert(0, ROOT)
    from pop3proto._ccore_build import make_ffi

    cc = "clang" if fuzzer else os.environ.get("CC", "gcc")
    if shutil.which(cc) is None:
        raise SystemExit(f"{cc} is needed (Debian: apt-get install -y {cc})")
    sanitizers = "address,undefined" + (",fuzzer-no-link" if fuzzer else "")
    flags = [
        f"-fsanitize={sanitizers}",
        "-fno-sanitize-recover=undefined",
        "-fno-omit-frame-pointer",
        "-g",
        "-O1",
    ]
    # The runtime comes from the preloaded library, not from the module.
    link = [] if fuzzer else ["-fsanitize=address,undefined"]
    os.environ["CC"] = cc
    os.environ["LDSHARED"] = f"{cc} -shared"
    ffi = make_ffi(MODULE, absolute=True, extra_compile_args=flags, extra_link_args=link)
    os.makedirs(outdir, exist_ok=True)
    for old in glob.glob(os.path.join(outdir, "pop3proto", "_cspeedups*")):
        os.remove(old)
    path = ffi.compile(tmpdir=outdir)
    return os.path.abspath(path), runtime_for(cc, fuzzer)


def load_instrumented(path: str) -> ModuleType:
    """Import the instrumented extension as ``pop3proto._cspeedups`` before
    pop3proto itself is imported, so ``pop3proto._ccore`` uses it."""
    if "pop3proto" in sys.modules:
        raise RuntimeError("load_instrumented() must run before pop3proto is imported")
    spec = importlib.util.spec_from_file_location(MODULE, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[MODULE] = module
    spec.loader.exec_module(module)
    sys.path.insert(0, ROOT)
    from pop3proto import _ccore

    if vars(_ccore)["lib"] is not module.lib:
        raise RuntimeError("pop3proto._ccore did not pick up the instrumented build")
    return module


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("outdir")
    ap.add_argument("--fuzzer", action="store_true", help="clang + libFuzzer coverage")
    args = ap.parse_args()
    path, runtime = build(args.outdir, args.fuzzer)
    print(path)
    print(runtime)


if __name__ == "__main__":
    main()
