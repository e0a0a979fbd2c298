"""The accelerator (``fastmux._speedups``, csrc/speedups.c), if built and
not disabled by ``FASTMUX_NO_SPEEDUPS=1``: ``speedups`` is the module or
None.  The loop takes its ``Stream`` as the base of ``Connection`` and the
epoll backend its ``Core``; the two must come together, so both ask here."""

from __future__ import annotations

import os
from typing import Any

from ._checks import check_bytes
from ._errors import ConnectionClosed

speedups: Any
try:
    if os.environ.get("FASTMUX_NO_SPEEDUPS") == "1":
        raise ImportError("disabled by FASTMUX_NO_SPEEDUPS=1")
    from . import _speedups as speedups  # type: ignore[attr-defined,no-redef]
except ImportError:
    speedups = None
else:
    speedups.setup(ConnectionClosed, check_bytes)
