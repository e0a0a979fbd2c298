"""The C ABI and its Python mirror agree (STYLE.md: the header is the boundary)."""

from __future__ import annotations

import os
import re

import pytest

from fastmux import _backend


@pytest.fixture(scope="module")
def core():
    if not _backend.epoll_available():
        if os.environ.get("FASTMUX_EXPECT_BACKEND") == "epoll":
            pytest.fail("FASTMUX_EXPECT_BACKEND=epoll but the C core does not import")
        pytest.skip("checks the C core, which is not built")
    from fastmux import _epoll

    return _epoll


def test_constants_match_the_header(core) -> None:
    consts = core.core_constants()
    for name, value in consts.items():
        assert getattr(_backend, name) == value, name


def test_cdef_is_read_from_the_header(core) -> None:
    # _build reads csrc/fastmux.h when imported: look for the header first
    # (an installed wheel has no csrc/ beside the package).
    import fastmux

    here = os.path.dirname(os.path.abspath(fastmux.__file__))
    header = os.path.join(os.path.dirname(here), "csrc", "fastmux.h")
    if not os.path.exists(header):
        pytest.skip("source tree not available (installed wheel)")
    from fastmux import _build

    cdef = _build.read_cdef(header)
    # Every function the header declares is exported by the compiled module.
    names = re.findall(r"\b(fm_[a-z_]+)\(", cdef)
    assert len(names) > 20
    for name in names:
        assert hasattr(core.lib, name), name
