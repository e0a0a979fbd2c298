"""cffi build script for the C core (``fastmux._core``).

The cdef is read from csrc/fastmux.h, between its FM_CDEF_BEGIN and
FM_CDEF_END markers, so the header stays the one description of the ABI.

``FASTMUX_SANITIZE=1`` builds with AddressSanitizer and UBSan (see
.ci/sanitize.sh); ``FASTMUX_DEBUG=1`` builds with -O0 -g.
"""

from __future__ import annotations

import os
import re

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(os.path.dirname(HERE), "csrc")
SOURCES = ["loop.c", "stream.c", "framing.c", "listen.c"]


def read_cdef(header: str) -> str:
    """The declarations between the FM_CDEF markers of `header`."""
    with open(header, encoding="utf-8") as f:
        text = f.read()
    m = re.search(r"/\* FM_CDEF_BEGIN \*/(.*)/\* FM_CDEF_END \*/", text, re.S)
    if m is None:
        raise RuntimeError(f"{header}: FM_CDEF markers not found")
    return m.group(1)


def _flags() -> tuple[list[str], list[str]]:
    cflags = ["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter",
              "-fvisibility=hidden"]
    ldflags: list[str] = []
    if os.environ.get("FASTMUX_DEBUG") == "1":
        cflags += ["-O0", "-g"]
    if os.environ.get("FASTMUX_SANITIZE") == "1":
        san = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer",
               "-fno-sanitize-recover=undefined"]
        cflags += ["-O1", "-g"] + san
        ldflags += san
    return cflags, ldflags


ffibuilder = FFI()
ffibuilder.cdef(read_cdef(os.path.join(CSRC, "fastmux.h")))
_cflags, _ldflags = _flags()
ffibuilder.set_source(
    "fastmux._core",
    '#include "fastmux.h"',
    sources=[os.path.relpath(os.path.join(CSRC, s)) for s in SOURCES],
    include_dirs=[os.path.relpath(CSRC)],
    extra_compile_args=_cflags,
    extra_link_args=_ldflags,
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
