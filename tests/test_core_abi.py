"""The C ABI and its Python mirror agree: the header is the one boundary.

fastmux/_constants.py is the one Python source of the numbers C and Python
share.  They are checked twice: against the header text (in a source tree)
and against the compiled core (wherever it is built, an installed wheel
included), so neither a stale build nor a hand edit on one side can pass.
"""

from __future__ import annotations

import os
import re

import pytest

import fastmux
from fastmux import _backend, _constants

_HERE = os.path.dirname(os.path.abspath(fastmux.__file__))
CSRC = os.path.join(os.path.dirname(_HERE), "csrc")


@pytest.fixture(scope="module")
def core():
    if not _backend.epoll_available():
        if os.environ.get("FASTMUX_EXPECT_BACKEND") == "epoll":
            pytest.fail("FASTMUX_EXPECT_BACKEND=epoll but the C core does not import")
        pytest.skip("checks the C core, which is not built")
    from fastmux import _epoll

    return _epoll


def header_defines() -> dict[str, int]:
    """FM_* integer #defines of csrc/fastmux.h and csrc/internal.h."""
    out: dict[str, int] = {}
    for name in ("fastmux.h", "internal.h"):
        with open(os.path.join(CSRC, name)) as f:
            text = f.read()
        for m in re.finditer(r"^#define (FM_\w+)\s+([^/\n]+?)\s*(?:/\*.*)?$", text, re.M):
            expr = re.sub(r"(?<=[0-9a-fA-F])u\b", "", m.group(2))
            if re.fullmatch(r"[\s()0-9a-fA-Fx*+<-]+", expr):
                out[m.group(1)] = int(eval(expr))  # digits and operators only
    return out


def test_constants_match_the_compiled_core(core) -> None:
    assert core.core_constants() == {n: getattr(_constants, n) for n in _constants.SHARED}


def test_constants_match_the_headers() -> None:
    if not os.path.isdir(CSRC):
        pytest.skip("source tree not available (installed wheel)")
    defines = header_defines()
    for name in _constants.SHARED:
        assert defines.get("FM_" + name) == getattr(_constants, name), name
    # And every event kind, close reason and framing kind of the header has
    # its Python name.
    for cname in defines:
        if re.match(r"FM_(EV|R|FR)_", cname):
            assert cname[3:] in _constants.SHARED, f"{cname} has no twin in _constants"


def test_the_header_check_can_fail(monkeypatch) -> None:
    """The check above compares values, not just names."""
    monkeypatch.setattr(_constants, "READ_BUDGET", _constants.READ_BUDGET + 1)
    if not os.path.isdir(CSRC):
        pytest.skip("source tree not available (installed wheel)")
    with pytest.raises(AssertionError):
        test_constants_match_the_headers()


def test_cdef_is_read_from_the_header(core) -> None:
    # _build reads csrc/fastmux.h when imported: look for the header first
    # (an installed wheel has no csrc/ beside the package).
    header = os.path.join(CSRC, "fastmux.h")
    if not os.path.exists(header):
        pytest.skip("source tree not available (installed wheel)")
    from fastmux import _build

    cdef = _build.read_cdef(header)
    # Every function the header declares is exported by the compiled module.
    names = re.findall(r"\b(fm_[a-z_]+)\(", cdef)
    assert len(names) > 20
    for name in names:
        assert hasattr(core.lib, name), name
