"""Build script: Cython extensions for _fastio, pure-Python fallback otherwise.

Metadata lives in pyproject.toml; this file only decides which extensions to
build.  The compiled path is optional by design:

* ``STORAGED_NO_EXTENSIONS=1`` at build time builds no extensions;
* no Cython, or no working C compiler: a warning, then a pure-Python install
  (``storaged.fastio`` falls back to ``storaged._purefastio``).

The CRC32C helper uses SSE4.2 through a per-function ``target`` attribute and
checks the CPU at import time, so no ``-msse4.2`` is passed and the modules
load on any x86-64 (and build on any architecture).
"""

from __future__ import annotations

import os
import sys

from setuptools import find_packages, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import (
    CCompilerError,
    CompileError,
    ExecError,
    FileError,
    LinkError,
    PlatformError,
)

BUILD_ERRORS = (CCompilerError, CompileError, ExecError, FileError, LinkError, PlatformError,
                OSError)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


def _warn(msg: str) -> None:
    bar = "*" * 72
    print(f"\n{bar}\nWARNING (storaged): {msg}\n"
          f"Installing without compiled extensions; storaged.fastio uses the pure-Python\n"
          f"reference (correct, but much slower).\n{bar}\n", file=sys.stderr)


class OptionalBuildExt(build_ext):
    """build_ext that adds optimisation flags and never fails the install."""

    def initialize_options(self) -> None:
        super().initialize_options()
        self._failed: set[str] = set()

    def build_extensions(self) -> None:
        if self.compiler.compiler_type == "unix":
            for ext in self.extensions:
                ext.extra_compile_args = ["-O3", *ext.extra_compile_args]
        super().build_extensions()
        # Forget what failed so the in-place copy / editable wheel skip it.
        self.extensions = [e for e in self.extensions if e.name not in self._failed]

    def run(self) -> None:
        try:
            super().run()
        except BUILD_ERRORS as exc:
            _warn(f"could not build the C extensions ({exc})")

    def build_extension(self, ext) -> None:
        try:
            super().build_extension(ext)
        except BUILD_ERRORS as exc:
            self._failed.add(ext.name)
            _warn(f"could not build extension {ext.name} ({exc})")


def _extensions() -> list:
    if _env_flag("STORAGED_NO_EXTENSIONS"):
        print("storaged: STORAGED_NO_EXTENSIONS is set, building no extensions",
              file=sys.stderr)
        return []
    try:
        from Cython.Build import cythonize
    except ImportError:
        _warn("Cython is not installed")
        return []
    from setuptools import Extension

    common = {"include_dirs": ["_fastio"], "depends": ["_fastio/_util.pxd"]}
    exts = [
        Extension(
            "_fastio._crc",
            ["_fastio/_crc.pyx", "_fastio/src/crc32c_impl.c"],
            **{**common, "depends": [*common["depends"], "_fastio/src/crc32c_impl.h"]},
        ),
        Extension("_fastio._aio", ["_fastio/_aio.pyx"], **common),
        Extension("_fastio._bhs", ["_fastio/_bhs.pyx"], **common),
        Extension("_fastio._cdb", ["_fastio/_cdb.pyx"], **common),
        Extension(
            "_fastio._nfsdir",
            ["_fastio/_nfsdir.pyx", "_fastio/src/nfsdir_impl.c"],
            **{**common, "depends": [*common["depends"], "_fastio/src/nfsdir_impl.h"]},
        ),
        Extension("_fastio._nfsrpc", ["_fastio/_nfsrpc.pyx"], **common),
        Extension(
            "_fastio._raid",
            ["_fastio/_raid.pyx", "_fastio/src/raid_impl.c"],
            **{**common, "depends": [*common["depends"], "_fastio/src/raid_impl.h"]},
        ),
    ]
    try:
        return cythonize(
            exts,
            include_path=["."],
            compiler_directives={"language_level": 3},
            quiet=True,
        )
    except Exception as exc:  # a Cython compile error must not block the install
        _warn(f"Cython failed ({exc})")
        return []


setup(
    packages=find_packages(include=["storaged", "storaged.*", "_fastio", "fence", "fence.*"]),
    ext_modules=_extensions(),
    # Build inputs are not runtime files: keep them out of wheels.
    package_data={"storaged": ["data/*"]},
    exclude_package_data={"_fastio": ["*.c", "*.pyx", "*.pxd", "src/*"]},
    cmdclass={"build_ext": OptionalBuildExt},
    zip_safe=False,
)
