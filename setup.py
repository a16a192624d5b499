"""setup.py declares the engine's C extension; everything else about the package is in pyproject.toml.

The extension is C (`_fastscan.c`) plus a small C++ file (`_re2shim.cc`) that calls RE2, so
regex scans run natively; it links the system RE2 (Debian: `apt-get install libre2-dev`) and
zlib (its crc32 for the tails a folded CRC leaves).
"""

from typing import Any

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

C_FLAGS = ["-O3", "-std=c11", "-Wall", "-Wextra", "-Werror=implicit-function-declaration"]
CXX_FLAGS = ["-O3", "-std=c++17", "-Wall", "-Wextra"]


class BuildExt(build_ext):
    """BuildExt gives C and C++ sources their own flags and says plainly when RE2 or zlib is missing."""

    def build_extensions(self) -> None:
        """BuildExt.build_extensions checks for RE2's and zlib's headers, then compiles each source."""
        import os
        import tempfile

        from setuptools.errors import CompileError

        with tempfile.TemporaryDirectory() as scratch:
            for header, package in (("re2/re2.h", "libre2-dev"), ("zlib.h", "zlib1g-dev")):
                probe = os.path.join(scratch, "probe.cc")
                with open(probe, "w") as source:
                    source.write(f"#include <{header}>\nint main() {{ return 0; }}\n")
                try:
                    self.compiler.compile([probe], output_dir=scratch, extra_postargs=["-std=c++17"])
                except CompileError:
                    raise SystemExit(
                        f"error: the header <{header}> was not found; the search engine's C extension "
                        f"links it. Install it (Debian/Ubuntu: `apt-get install {package}`) and build again."
                    ) from None
        original = self.compiler._compile

        def compile_one(obj: str, src: str, ext: str, cc_args: Any, postargs: Any, pp_opts: Any) -> None:
            del postargs  # replaced by the flags of the source's language
            flags = CXX_FLAGS if src.endswith(".cc") else C_FLAGS
            original(obj, src, ext, cc_args, flags, pp_opts)

        self.compiler._compile = compile_one
        super().build_extensions()


setup(
    ext_modules=[
        Extension(
            "services.search.engine._fastscan",
            sources=["services/search/engine/_fastscan.c", "services/search/engine/_re2shim.cc"],
            libraries=["re2", "z"],
            language="c++",
        )
    ],
    cmdclass={"build_ext": BuildExt},
)
