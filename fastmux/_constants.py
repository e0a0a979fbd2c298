"""Numbers the C core and Python share: the one Python source for them.

Every name here is ``FM_<NAME>`` in csrc/fastmux.h (event kinds, close
reasons, framing kinds) or csrc/internal.h (limits), with the same value;
the compiled core reports its limits through ``fm_const`` and
tests/test_core_abi.py fails if any of them differs, in the headers or in
the built module.  This module imports nothing, so every other module may
import it.
"""

# Event kinds in a batch (FM_EV_*).
EV_MSG = 1  # id=conn; blob[start:end] is the payload
EV_ACCEPT = 2  # id=new conn; start=listener id; end=fd
EV_CONNECTED = 3  # id=conn: a non-blocking connect completed
EV_EOF = 4  # id=conn: peer half-closed, all messages delivered
EV_CLOSED = 5  # id=conn; start=errno or 0; end=R_* reason
EV_DRAIN = 6  # id=conn: queued output fell to the low watermark
EV_WATCH = 7  # id=watch id; start=WATCH_* bits ready

# What a watch waits for and reports (FM_WATCH_*; selectors' EVENT_* values).
WATCH_READ = 1
WATCH_WRITE = 2

# Why a connection closed: the `end` of EV_CLOSED (FM_R_*).
R_NONE = 0  # closed or aborted locally, or clean
R_ERROR = 1  # a socket error; `start` holds errno
R_TOOLARGE = 2  # a message exceeded its framing's max_size
R_WBUFFULL = 3  # queued output exceeded max_write_buffer
R_IDLE = 4  # no inbound bytes within idle_timeout
R_REJECTED = 5  # listener at max_connections (never reported)

# Framing kinds (FM_FR_*).
FR_RAW = 0
FR_DELIM = 1
FR_LENGTH = 2
FR_FIXED = 3

# Limits, the same on both backends (FM_* in internal.h).
READ_CHUNK = 256 * 1024  # bytes asked for by one recv
READ_BUDGET = 256 * 1024  # bytes read from one connection per poll (fairness)
ACCEPT_BUDGET = 128  # connections accepted from one listener per poll
BATCH_MAX = 4096  # events in one batch (soft limit)
DEFAULT_HIGH = 64 * 1024  # write queue high watermark: on_drain is owed above it
DEFAULT_LOW = 16 * 1024  # write queue low watermark: on_drain fires at or below it
DISCARD_MAX = 1024 * 1024  # unread input discarded before a graceful close
EMFILE_BACKOFF_MS = 100  # accepting pauses this long when out of fds or memory
# The C write path (fm_queue) sends a write this big at once instead of
# holding it for the end of the iteration: coalescing no longer pays, and the
# payload goes to the kernel without a copy.  Not observable but in syscalls.
SEND_NOW = 16 * 1024

# Python-side defaults (no C counterpart: Python passes them to the core).
DEFAULT_MAX_WRITE_BUFFER = 64 * 1024 * 1024  # queued output that cuts a peer off
DEFAULT_MAX_SIZE = 1024 * 1024  # one message's payload, for every framing spec

#: The names that must equal FM_<name> in the C headers.
SHARED = (
    "EV_MSG", "EV_ACCEPT", "EV_CONNECTED", "EV_EOF", "EV_CLOSED", "EV_DRAIN", "EV_WATCH",
    "WATCH_READ", "WATCH_WRITE",
    "R_NONE", "R_ERROR", "R_TOOLARGE", "R_WBUFFULL", "R_IDLE", "R_REJECTED",
    "FR_RAW", "FR_DELIM", "FR_LENGTH", "FR_FIXED",
    "READ_CHUNK", "READ_BUDGET", "ACCEPT_BUDGET", "BATCH_MAX", "DEFAULT_HIGH",
    "DEFAULT_LOW", "DISCARD_MAX", "EMFILE_BACKOFF_MS", "SEND_NOW",
)
