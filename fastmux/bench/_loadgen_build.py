"""cffi build script for the benchmark's load generator (``fastmux.bench._loadgen``).

Its own module, separate from the loop's core (``fastmux._core``), so the
benchmark shares no code with what it measures.  The cdef is read from
csrc/loadgen/loadgen.h between its LG_CDEF markers, as fastmux/_build.py does
for the core.
"""

from __future__ import annotations

import os
import re

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
# fastmux/bench/ -> the repository root -> csrc/loadgen/
CSRC = os.path.join(os.path.dirname(os.path.dirname(HERE)), "csrc", "loadgen")


def read_cdef(header: str) -> str:
    """The declarations between the LG_CDEF markers of `header`."""
    with open(header, encoding="utf-8") as f:
        text = f.read()
    m = re.search(r"/\* LG_CDEF_BEGIN \*/(.*)/\* LG_CDEF_END \*/", text, re.S)
    if m is None:
        raise RuntimeError(f"{header}: LG_CDEF markers not found")
    return m.group(1)


ffibuilder = FFI()
ffibuilder.cdef(read_cdef(os.path.join(CSRC, "loadgen.h")))
ffibuilder.set_source(
    "fastmux.bench._loadgen",
    '#include "loadgen.h"',
    sources=[os.path.relpath(os.path.join(CSRC, "loadgen.c"))],
    include_dirs=[os.path.relpath(CSRC)],
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter",
                        "-fvisibility=hidden"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
