"""Framing specs and the sans-I/O reference framer.

A framing spec (``Raw``, ``Lines``, ``Delimiter``, ``LengthPrefixed``,
``Fixed``) is an immutable value: it says how a byte stream splits into
messages and may be shared by any number of connections and loops.

``split(spec, buf)`` is the reference model of framing: a pure function over
bytes, no sockets.  The select backend frames with it, and the tests compare
the C framers (csrc/framing.c) against it byte for byte.
"""

from __future__ import annotations

from typing import List, Literal, Tuple

from ._checks import check_bytes, check_int
from ._constants import DEFAULT_MAX_SIZE
from ._constants import FR_DELIM as _FR_DELIM
from ._constants import FR_FIXED as _FR_FIXED
from ._constants import FR_LENGTH as _FR_LENGTH
from ._constants import FR_RAW as _FR_RAW
from ._errors import MessageTooLarge

#: Bounds `max_size` and `Fixed` sizes: the C framers count in 32 bits.
_MAX_SIZE = 0x7FFFFFFF


class Framing:
    """Base class of the framing specs.  Instances are immutable."""

    __slots__ = ()
    _kind: int = _FR_RAW

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    def _key(self) -> tuple[object, ...]:
        return (self._kind,)

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, Framing) and type(other) is type(self)
                and other._key() == self._key())

    def __hash__(self) -> int:
        return hash(self._key())

    # The fields the backends read; overridden where they mean something.
    @property
    def _max(self) -> int:
        return 0

    @property
    def _n(self) -> int:
        return 0

    @property
    def _sep(self) -> bytes:
        return b""

    @property
    def _little(self) -> bool:
        return False

    def _unsplit(self, message: bytes) -> bytes:
        """The raw bytes that framed into `message` (used to re-frame)."""
        return message


class Raw(Framing):
    """Every read as it comes: chunk boundaries are unspecified.  The default."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "Raw()"


class Delimiter(Framing):
    """Messages end with `sep` (excluded from the message).

    A message longer than `max_size` bytes (default 1 MiB) disconnects the
    peer with :class:`MessageTooLarge`; so does a run of `max_size` bytes
    with no `sep` in it, without waiting for more."""

    __slots__ = ("sep", "max_size")
    sep: bytes
    max_size: int

    def __init__(self, sep: bytes, *, max_size: int = DEFAULT_MAX_SIZE) -> None:
        sep = check_bytes(sep, "sep")
        if not sep:
            raise ValueError("Delimiter needs a non-empty separator")
        if len(sep) > 255:
            raise ValueError("a separator is at most 255 bytes")
        _check_max(max_size)
        object.__setattr__(self, "sep", sep)
        object.__setattr__(self, "max_size", int(max_size))

    _kind = _FR_DELIM

    def _key(self) -> tuple[object, ...]:
        return (self._kind, self.sep, self.max_size)

    @property
    def _max(self) -> int:
        return self.max_size

    @property
    def _sep(self) -> bytes:
        return self.sep

    def _unsplit(self, message: bytes) -> bytes:
        return message + self.sep

    def __repr__(self) -> str:
        return f"Delimiter({self.sep!r}, max_size={self.max_size})"


class Lines(Delimiter):
    """Messages end with ``b"\\n"``, which is stripped (a ``\\r`` before it is
    kept: use ``Delimiter(b"\\r\\n")`` for CRLF protocols)."""

    __slots__ = ()

    def __init__(self, *, max_size: int = DEFAULT_MAX_SIZE) -> None:
        super().__init__(b"\n", max_size=max_size)

    def __repr__(self) -> str:
        return f"Lines(max_size={self.max_size})"


class LengthPrefixed(Framing):
    """Each message is an unsigned `header_size`-byte length (1, 2, 4 or 8;
    `byteorder` "big" or "little") followed by that many payload bytes.

    A header announcing more than `max_size` (default 1 MiB) disconnects the
    peer with :class:`MessageTooLarge` at once."""

    __slots__ = ("header_size", "byteorder", "max_size")
    header_size: int
    byteorder: str
    max_size: int

    def __init__(self, header_size: int = 4, byteorder: str = "big", *,
                 max_size: int = DEFAULT_MAX_SIZE) -> None:
        header_size = check_int(header_size, "header_size", 1, 8)
        if header_size not in (1, 2, 4, 8):
            raise ValueError(f"header_size must be 1, 2, 4 or 8, got {header_size}")
        if not isinstance(byteorder, str):
            raise TypeError(f"byteorder must be a str, got {byteorder!r}")
        if byteorder not in ("big", "little"):
            raise ValueError(f"byteorder must be 'big' or 'little', got {byteorder!r}")
        _check_max(max_size)
        object.__setattr__(self, "header_size", header_size)
        object.__setattr__(self, "byteorder", byteorder)
        object.__setattr__(self, "max_size", int(max_size))

    _kind = _FR_LENGTH

    def _key(self) -> tuple[object, ...]:
        return (self._kind, self.header_size, self.byteorder, self.max_size)

    @property
    def _max(self) -> int:
        return self.max_size

    @property
    def _n(self) -> int:
        return self.header_size

    @property
    def _little(self) -> bool:
        return self.byteorder == "little"

    def _unsplit(self, message: bytes) -> bytes:
        return len(message).to_bytes(self.header_size, self.byteorder) + message  # type: ignore[arg-type]

    def __repr__(self) -> str:
        return (f"LengthPrefixed({self.header_size}, {self.byteorder!r}, "
                f"max_size={self.max_size})")


class Fixed(Framing):
    """Every message is exactly `size` bytes."""

    __slots__ = ("size",)
    size: int

    def __init__(self, size: int) -> None:
        size = check_int(size, "size", 1, _MAX_SIZE)
        object.__setattr__(self, "size", size)

    _kind = _FR_FIXED

    def _key(self) -> tuple[object, ...]:
        return (self._kind, self.size)

    @property
    def _n(self) -> int:
        return self.size

    def __repr__(self) -> str:
        return f"Fixed({self.size})"


def _check_max(max_size: int) -> None:
    check_int(max_size, "max_size", 1, _MAX_SIZE)


def split(spec: Framing, buf: bytes, start: int = 0) -> Tuple[List[bytes], int]:
    """Split the complete messages out of ``buf[start:]``.

    Returns ``(messages, consumed)``: the payloads in order and the offset in
    `buf` just past the last complete message (the rest is an incomplete
    tail).  Raises :class:`MessageTooLarge` if a message over ``max_size`` is
    found or certain (a header announcing more, or `max_size` bytes and no
    separator); the messages before it are lost to the caller, so callers
    that must deliver them use :func:`split_until_error`.
    """
    msgs, consumed, err = split_until_error(spec, buf, start)
    if err is not None:
        raise err
    return msgs, consumed


def split_until_error(spec: Framing, buf: bytes, start: int = 0
                      ) -> Tuple[List[bytes], int, MessageTooLarge | None]:
    """Like :func:`split` but returns the error as a third item, after the
    messages that precede the oversized one."""
    msgs, consumed, err, _ = split_scan(spec, buf, start)
    return msgs, consumed, err


def split_scan(spec: Framing, buf: bytes | bytearray, start: int = 0, scan: int = 0
               ) -> Tuple[List[bytes], int, MessageTooLarge | None, int]:
    """:func:`split_until_error` that resumes a delimiter search where the
    last one stopped: the twin of fm__split in csrc/framing.c and its scan.

    `scan` is how many bytes of ``buf[start:]`` are known to hold no
    separator (an earlier call on the same unframed bytes found none there);
    the fourth item returned is that count for the bytes after the consumed
    offset.  A caller that keeps a connection's unframed tail, appends each
    read to it and passes the count back scans a long message once, not
    once per read; it resets the count to 0 whenever the bytes before it
    change (a new framing, pushed-back bytes).  Only Delimiter uses it; the
    other framings return 0.
    """
    kind = spec._kind
    end = len(buf)
    out: List[bytes] = []
    pos = start
    if kind == _FR_RAW:
        if end > pos:
            # bytes(buf) when it is all: one copy of a bytearray, not two.
            out.append(bytes(buf[pos:end]) if pos else bytes(buf))
        return out, end, None, 0
    if kind == _FR_DELIM:
        sep = spec._sep
        seplen = len(sep)
        limit = spec._max
        at = pos + scan  # where the search resumes
        while True:
            i = buf.find(sep, at)
            if i < 0:
                # Bytes that cannot start a separator are known clean.
                scan = max(end - (seplen - 1) - pos, 0)
                if end - pos > limit + seplen - 1:
                    return out, pos, MessageTooLarge(
                        f"no separator within max_size={limit} bytes"), scan
                return out, pos, None, scan
            if i - pos > limit:
                return out, pos, MessageTooLarge(
                    f"message of {i - pos} bytes exceeds max_size={limit}"), 0
            out.append(bytes(buf[pos:i]))
            pos = at = i + seplen
    if kind == _FR_LENGTH:
        hs = spec._n
        order: Literal["little", "big"] = "little" if spec._little else "big"
        limit = spec._max
        while end - pos >= hs:
            n = int.from_bytes(buf[pos:pos + hs], order)
            if n > limit:
                return out, pos, MessageTooLarge(
                    f"length header announces {n} bytes, max_size={limit}"), 0
            if end - pos - hs < n:
                break
            out.append(bytes(buf[pos + hs:pos + hs + n]))
            pos += hs + n
        return out, pos, None, 0
    if kind == _FR_FIXED:
        size = spec._n
        while end - pos >= size:
            out.append(bytes(buf[pos:pos + size]))
            pos += size
        return out, pos, None, 0
    raise ValueError(f"unknown framing kind {kind}")
