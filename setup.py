"""Build the C core through cffi where it can be built; elsewhere install pure Python.

Environment switches (read at install time):
  FASTMUX_PURE=1       do not build the C core (the "select" backend is used)
  FASTMUX_REQUIRE_C=1  a failed C build is an install error, not a warning
  FASTMUX_SANITIZE=1   build with AddressSanitizer + UBSan (see fastmux/_build.py)
"""

import os
import sys
import warnings

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


def want_c() -> bool:
    if os.environ.get("FASTMUX_PURE") == "1":
        return False
    return sys.platform.startswith("linux")


class optional_build_ext(build_ext):
    """Turn a failed C build into a warning (unless FASTMUX_REQUIRE_C=1)."""

    def run(self):
        try:
            super().run()
        except Exception as e:  # noqa: BLE001 - any compiler failure
            self._failed(e)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as e:  # noqa: BLE001
            self._failed(e)

    def _failed(self, e):
        if os.environ.get("FASTMUX_REQUIRE_C") == "1":
            raise
        warnings.warn(
            f"fastmux: building the C core failed ({e}); installing the "
            "pure-Python backend only. Set FASTMUX_REQUIRE_C=1 to make this an error."
        )


kwargs = {}
if want_c():
    kwargs["cffi_modules"] = ["fastmux/_build.py:ffibuilder",
                              "fastmux/bench/_loadgen_build.py:ffibuilder"]
    kwargs["cmdclass"] = {"build_ext": optional_build_ext}
    # The dispatch accelerator (csrc/speedups.c): plain limited-API C.
    san = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer"] \
        if os.environ.get("FASTMUX_SANITIZE") == "1" else []
    kwargs["ext_modules"] = [
        Extension(
            "fastmux._speedups",
            ["csrc/speedups.c"],
            py_limited_api=True,
            define_macros=[("Py_LIMITED_API", "0x030A0000")],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"] + san,
            extra_link_args=san,
        )
    ]
    # cffi emits Py_LIMITED_API code; tag the wheel abi3 for the oldest
    # CPython our cffi floor supports.
    kwargs["options"] = {"bdist_wheel": {"py_limited_api": "cp310"}}

setup(**kwargs)
