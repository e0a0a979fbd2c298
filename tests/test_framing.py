"""The framing specs and the sans-I/O reference framer ``split`` (no sockets).

``split`` is the model the select backend frames with and the C framers are
compared against (test_framing_io.py runs the same streams through both
backends); here it is checked against hand-written cases and against a
simpler model with hypothesis.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fastmux
from fastmux import Delimiter, Fixed, LengthPrefixed, Lines, Raw
from fastmux._framing import DEFAULT_MAX_SIZE, split, split_scan, split_until_error

HEADER_SIZES = [1, 2, 4, 8]
ORDERS = ["big", "little"]


# --- the specs ----------------------------------------------------------------

def test_specs_are_public_names():
    for name in ("Raw", "Lines", "Delimiter", "LengthPrefixed", "Fixed"):
        assert name in fastmux.__all__
        assert getattr(fastmux, name) is globals()[name]


@pytest.mark.parametrize("spec", [Raw(), Lines(), Delimiter(b"\r\n"), LengthPrefixed(), Fixed(3)],
                         ids=repr)
def test_specs_are_immutable_and_hashable(spec):
    with pytest.raises(AttributeError):
        spec.max_size = 5
    assert hash(spec) == hash(spec)
    assert {spec: 1}[spec] == 1


def test_spec_equality():
    assert Lines() == Lines()
    assert Delimiter(b"\r\n") == Delimiter(b"\r\n")
    assert Delimiter(b"\r\n") != Delimiter(b"\n")
    assert LengthPrefixed(2, "little") == LengthPrefixed(2, "little")
    assert LengthPrefixed(2, "little") != LengthPrefixed(2, "big")
    assert LengthPrefixed(4, max_size=10) != LengthPrefixed(4, max_size=11)
    assert Fixed(4) == Fixed(4) and Fixed(4) != Fixed(5)
    assert Raw() == Raw()
    assert Raw() != Fixed(1)


def test_defaults():
    assert Lines().max_size == DEFAULT_MAX_SIZE == 1024 * 1024
    assert Lines().sep == b"\n"
    assert Delimiter(b"x").max_size == DEFAULT_MAX_SIZE
    lp = LengthPrefixed()
    assert (lp.header_size, lp.byteorder, lp.max_size) == (4, "big", DEFAULT_MAX_SIZE)


@pytest.mark.parametrize("make", [
    lambda: Delimiter(b""),
    lambda: Delimiter(b"x" * 256),
    lambda: Lines(max_size=0),
    lambda: Delimiter(b"\n", max_size=-1),
    lambda: LengthPrefixed(3),
    lambda: LengthPrefixed(4, "middle"),
    lambda: LengthPrefixed(4, max_size=0),
    lambda: Fixed(0),
    lambda: Fixed(-1),
])
def test_invalid_specs_raise_value_error(make):
    with pytest.raises(ValueError):
        make()


# --- split: hand-written cases --------------------------------------------------

def test_raw_returns_everything():
    assert split(Raw(), b"") == ([], 0)
    assert split(Raw(), b"abc") == ([b"abc"], 3)


def test_lines_strips_only_the_newline():
    assert split(Lines(), b"a\r\nb\n\nc") == ([b"a\r", b"b", b""], 6)


def test_empty_messages_are_delivered():
    assert split(Lines(), b"\n\n") == ([b"", b""], 2)
    assert split(Delimiter(b"--"), b"----") == ([b"", b""], 4)
    assert split(LengthPrefixed(2), b"\x00\x00\x00\x00") == ([b"", b""], 4)


def test_delimiter_multibyte():
    assert split(Delimiter(b"\r\n\r\n"), b"GET /\r\nH: v\r\n\r\nbody") == ([b"GET /\r\nH: v"], 15)
    # A partial separator at the end is an incomplete tail.
    assert split(Delimiter(b"\r\n\r\n"), b"abc\r\n\r") == ([], 0)
    # Overlapping candidates: the first complete occurrence ends the message.
    assert split(Delimiter(b"aab"), b"aaab") == ([b"a"], 4)


@pytest.mark.parametrize("hs", HEADER_SIZES)
@pytest.mark.parametrize("order", ORDERS)
def test_length_prefixed(hs, order):
    spec = LengthPrefixed(hs, order)
    msgs = [b"", b"x", b"hello", bytes(range(200))]
    stream = b"".join(len(m).to_bytes(hs, order) + m for m in msgs)
    assert split(spec, stream) == (msgs, len(stream))
    # Incomplete header, incomplete payload: not consumed.
    assert split(spec, stream + b"\x00" * (hs - 1)) == (msgs, len(stream))
    assert split(spec, stream + (5).to_bytes(hs, order) + b"abc") == (msgs, len(stream))


def test_length_prefixed_byte_order_matters():
    assert split(LengthPrefixed(2, "big"), b"\x00\x01A") == ([b"A"], 3)
    assert split(LengthPrefixed(2, "little"), b"\x01\x00A") == ([b"A"], 3)


def test_fixed():
    assert split(Fixed(3), b"abcdefgh") == ([b"abc", b"def"], 6)
    assert split(Fixed(1), b"ab") == ([b"a", b"b"], 2)


def test_split_from_offset():
    assert split(Lines(), b"a\nb\nc", 2) == ([b"b"], 4)


def test_max_size_delimiter():
    spec = Lines(max_size=4)
    assert split(spec, b"abcd\n") == ([b"abcd"], 5)  # exactly max_size is fine
    with pytest.raises(fastmux.MessageTooLarge):
        split(spec, b"abcde\n")
    # No separator within max_size bytes: certain to be too large already.
    with pytest.raises(fastmux.MessageTooLarge):
        split(spec, b"abcdef")
    # ... but max_size bytes without the separator yet is still fine.
    assert split(spec, b"abcd") == ([], 0)
    msgs, consumed, err = split_until_error(spec, b"ok\nabcdefgh")
    assert (msgs, consumed) == ([b"ok"], 3)
    assert isinstance(err, fastmux.MessageTooLarge)


def test_max_size_length_header_announcing_more():
    spec = LengthPrefixed(4, max_size=100)
    assert split(spec, (100).to_bytes(4, "big") + b"x" * 100) == ([b"x" * 100], 104)
    with pytest.raises(fastmux.MessageTooLarge):
        split(spec, (101).to_bytes(4, "big"))  # the header alone is enough
    msgs, consumed, err = split_until_error(spec, b"\x00\x00\x00\x01A" + (2**32 - 1).to_bytes(4, "big"))
    assert (msgs, consumed) == ([b"A"], 5)
    assert isinstance(err, fastmux.MessageTooLarge)


# --- split vs simple models (hypothesis) --------------------------------------

def encode(spec, msgs):
    return b"".join(spec._unsplit(m) for m in msgs)


def feed_in_chunks(spec, stream, cuts):
    """Frame `stream` arriving in pieces cut at `cuts`, as a backend does."""
    buf = b""
    out = []
    prev = 0
    for cut in sorted(set(cuts)) + [len(stream)]:
        buf += stream[prev:cut]
        prev = cut
        msgs, consumed = split(spec, buf)
        out += msgs
        buf = buf[consumed:]
    return out, buf



def feed_scanning(spec, stream, cuts, carry=True):
    """Frame `stream` arriving in pieces as the select backend does: one
    growing bytearray, and (if `carry`) the scan offset passed from call to
    call.  Returns the messages, the unframed rest and the error, if any."""
    buf = bytearray()
    scan = 0
    out = []
    prev = 0
    for cut in sorted(set(cuts)) + [len(stream)]:
        buf += stream[prev:cut]
        prev = cut
        msgs, consumed, err, scan = split_scan(spec, buf, 0, scan if carry else 0)
        out += msgs
        del buf[:consumed]
        if err is not None:
            return out, bytes(buf), type(err)
    return out, bytes(buf), None


seps = st.binary(min_size=1, max_size=4)


@settings(max_examples=300, deadline=None)
@given(sep=seps, data=st.binary(max_size=200))
def test_delimiter_matches_bytes_split(sep, data):
    parts = data.split(sep)
    expected = parts[:-1]
    assert split(Delimiter(sep), data) == (expected, len(data) - len(parts[-1]))


@settings(max_examples=300, deadline=None)
@given(sep=seps, data=st.binary(max_size=200), cuts=st.lists(st.integers(0, 200), max_size=10))
def test_delimiter_chunking_does_not_matter(sep, data, cuts):
    cuts = [c for c in cuts if c <= len(data)]
    msgs, tail = feed_in_chunks(Delimiter(sep), data, cuts)
    parts = data.split(sep)
    assert msgs == parts[:-1]
    assert tail == parts[-1]


@settings(max_examples=200, deadline=None)
@given(hs=st.sampled_from(HEADER_SIZES), order=st.sampled_from(ORDERS),
       msgs=st.lists(st.binary(max_size=300), max_size=8),
       extra=st.binary(max_size=12), cuts=st.lists(st.integers(0, 3000), max_size=10))
def test_length_prefixed_round_trip(hs, order, msgs, extra, cuts):
    spec = LengthPrefixed(hs, order, max_size=300)
    stream = encode(spec, msgs)
    # A trailing incomplete message (announcing more than `extra` holds).
    tail = (len(extra) + 1).to_bytes(hs, order) + extra
    full = stream + tail[: len(tail) - 1]
    assert split(spec, full) == (msgs, len(stream))
    got, rest = feed_in_chunks(spec, full, [c for c in cuts if c <= len(full)])
    assert got == msgs and rest == full[len(stream):]


@settings(max_examples=200, deadline=None)
@given(size=st.integers(1, 20), data=st.binary(max_size=200),
       cuts=st.lists(st.integers(0, 200), max_size=10))
def test_fixed_matches_slicing(size, data, cuts):
    n = len(data) // size
    expected = [data[i * size:(i + 1) * size] for i in range(n)]
    assert split(Fixed(size), data) == (expected, n * size)
    got, rest = feed_in_chunks(Fixed(size), data, [c for c in cuts if c <= len(data)])
    assert got == expected and rest == data[n * size:]


@settings(max_examples=200, deadline=None)
@given(limit=st.integers(1, 30), data=st.binary(max_size=80))
def test_delimiter_max_size_model(limit, data):
    """Raises iff a complete message is over `limit`, or the unterminated tail
    is already longer than `limit` (it can never become a legal message)."""
    spec = Lines(max_size=limit)
    parts = data.split(b"\n")
    too_large = any(len(p) > limit for p in parts[:-1]) or len(parts[-1]) > limit
    if too_large:
        with pytest.raises(fastmux.MessageTooLarge):
            split(spec, data)
        msgs, consumed, err = split_until_error(spec, data)
        assert isinstance(err, fastmux.MessageTooLarge)
        # The messages before the offending one are kept.
        ok = []
        for p in parts[:-1]:
            if len(p) > limit:
                break
            ok.append(p)
        assert msgs == ok
    else:
        assert split(spec, data) == (parts[:-1], len(data) - len(parts[-1]))


# Small alphabets, so that separators, partial separators and separators
# straddling a cut are common.
small_seps = st.text("ab\n", min_size=1, max_size=3).map(str.encode)


@settings(max_examples=400, deadline=None)
@given(sep=small_seps, data=st.text("ab\nx", max_size=200).map(str.encode),
       cuts=st.lists(st.integers(0, 200), max_size=12), limit=st.integers(1, 40))
def test_delimiter_scan_offset_changes_only_the_work(sep, data, cuts, limit):
    """Resuming the search where the last one stopped (csrc/framing.c's scan,
    kept per connection by the select backend) gives the same messages, rest
    and verdict as searching the unframed bytes from the start every time."""
    spec = Delimiter(sep, max_size=limit)
    cuts = [c for c in cuts if c <= len(data)]
    got = feed_scanning(spec, data, cuts)
    assert got == feed_scanning(spec, data, cuts, carry=False)
    if got[2] is None:
        msgs, consumed = split(spec, data)
        assert got[:2] == (msgs, data[consumed:])


@pytest.mark.parametrize("sep", [b"\n", b"\r\n\r\n"])
def test_delimiter_scan_offset_counts_clean_bytes(sep):
    """The offset returned covers the bytes that cannot start a separator
    (all but the last len(sep) - 1), and a resumed search still finds a
    separator that began in those last bytes."""
    spec = Delimiter(sep)
    msgs, consumed, err, scan = split_scan(spec, bytearray(b"x" * 10 + sep[:-1]))
    assert (msgs, consumed, err, scan) == ([], 0, None, 10)
    msgs, consumed, err, scan = split_scan(spec, bytearray(b"x" * 10 + sep + b"yy"), 0, scan)
    assert (msgs, consumed, err, scan) == ([b"x" * 10], 10 + len(sep), None, max(2 - (len(sep) - 1), 0))
