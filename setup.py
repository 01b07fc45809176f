"""Build the optional compiled core (cffi, API mode).

All metadata lives in pyproject.toml; this file only adds the cffi extension,
and makes it optional: when it cannot be built (no compiler, no cffi, not
CPython) the install goes on and the package runs on its pure-Python core.
"""

from __future__ import annotations

import os
import platform
import sys
from typing import Any

from setuptools import setup  # type: ignore[import-untyped,unused-ignore]
from setuptools.command.build_ext import (  # type: ignore[import-untyped,unused-ignore]
    build_ext,
)


class OptionalBuildExt(build_ext):  # type: ignore[misc,unused-ignore]
    """build_ext that warns instead of failing when a C extension does not build."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:
            self._skip("the compiled core", exc)

    def build_extension(self, ext: Any) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:
            self._skip(ext.name, exc)

    def copy_extensions_to_source(self) -> None:
        # In-place and editable builds copy the built files next to the
        # sources: skip the ones that did not build.
        self.extensions: list[Any] = [
            ext
            for ext in self.extensions
            if os.path.exists(self.get_ext_fullpath(ext.name))
            or os.path.exists(os.path.join(self.build_lib, self.get_ext_filename(ext.name)))
        ]
        super().copy_extensions_to_source()

    @staticmethod
    def _skip(what: str, exc: BaseException) -> None:
        sys.stderr.write(
            f"WARNING: {what} was not built ({exc!r}); pop3proto will use its pure-Python core.\n"
        )


def cffi_modules() -> list[str]:
    if os.environ.get("POP3PROTO_PUREPYTHON") or platform.python_implementation() != "CPython":
        return []
    try:
        import cffi  # type: ignore[import-untyped,unused-ignore]  # noqa: F401
    except ImportError:
        sys.stderr.write("WARNING: cffi is missing; building without the compiled core.\n")
        return []
    return ["pop3proto/_ccore_build.py:ffibuilder"]


modules = cffi_modules()
setup(
    cmdclass={"build_ext": OptionalBuildExt},
    **({"cffi_modules": modules} if modules else {}),
)
