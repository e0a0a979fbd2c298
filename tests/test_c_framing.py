"""The C framers against the reference model (fastmux/_framing.py).

Random messages, random chunking and byte-at-a-time feeding: the C framer's
messages, consumed count and oversize verdict must equal the Python ones."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastmux import _backend, _framing
from fastmux._framing import Delimiter, Fixed, LengthPrefixed, Lines, Raw


@pytest.fixture(scope="module")
def c_split():
    """The C framer; these tests compare it with the model, so they need the
    C core (and fail rather than skip where CI expects it)."""
    if not _backend.epoll_available():
        if os.environ.get("FASTMUX_EXPECT_BACKEND") == "epoll":
            pytest.fail("FASTMUX_EXPECT_BACKEND=epoll but the C core does not import")
        pytest.skip("the C core is not built")
    from fastmux._epoll import c_split

    return c_split


def _c(c_split, spec, buf: bytes):
    return c_split(spec._kind, spec._max, spec._n, spec._sep, spec._little, buf)


def _py(spec, buf: bytes):
    msgs, consumed, err = _framing.split_until_error(spec, buf)
    return msgs, consumed, err is not None


specs = st.one_of(
    st.just(Raw()),
    st.builds(Lines, max_size=st.integers(1, 64)),
    st.builds(Delimiter, st.sampled_from([b"\r\n", b"\r\n\r\n", b"ab", b"aab", b"\x00"]),
              max_size=st.integers(1, 64)),
    st.builds(LengthPrefixed, st.sampled_from([1, 2, 4, 8]), st.sampled_from(["big", "little"]),
              max_size=st.integers(0, 64).map(lambda n: max(n, 1))),
    st.builds(Fixed, st.integers(1, 9)),
)

# Bytes from a small alphabet so separators and small headers are common.
streams = st.lists(st.sampled_from([b"a", b"b", b"\r", b"\n", b"\x00", b"\x01", b"\r\n",
                                    b"ab", b"\x00\x00\x00\x03", b"xyz"]), max_size=60).map(b"".join)


@settings(max_examples=400, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spec=specs, buf=streams)
def test_whole_buffer_matches_model(c_split, spec, buf: bytes) -> None:
    assert _c(c_split, spec, buf) == _py(spec, buf)


def _feed(split, spec, chunks):
    """Frame a stream delivered in chunks, as a connection does: keep the
    unconsumed tail and append the next chunk."""
    tail = b""
    out: list[bytes] = []
    for chunk in chunks:
        tail += chunk
        msgs, consumed, toolarge = split(spec, tail)
        out += msgs
        tail = tail[consumed:]
        if toolarge:
            return out, True
    return out, False


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spec=specs, buf=streams, cuts=st.lists(st.integers(0, 200), max_size=10))
def test_random_chunking_matches_model(c_split, spec, buf: bytes, cuts) -> None:
    points = sorted({min(c, len(buf)) for c in cuts} | {0, len(buf)})
    chunks = [buf[a:b] for a, b in zip(points, points[1:])]
    c_result = _feed(lambda s, b: _c(c_split, s, b), spec, chunks)
    py_result = _feed(_py, spec, chunks)
    if isinstance(spec, Raw):
        # Raw chunk boundaries are unspecified; the bytes must agree.
        assert b"".join(c_result[0]) == b"".join(py_result[0])
    else:
        assert c_result == py_result


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spec=specs, buf=streams)
def test_byte_at_a_time_matches_whole(c_split, spec, buf: bytes) -> None:
    one = _feed(lambda s, b: _c(c_split, s, b), spec, [buf[i:i + 1] for i in range(len(buf))])
    whole = _feed(_py, spec, [buf])
    if isinstance(spec, Raw):
        assert b"".join(one[0]) == b"".join(whole[0])
    else:
        assert one == whole


def test_length_header_announcing_4gib_is_refused_at_once(c_split) -> None:
    spec = LengthPrefixed(4)
    msgs, consumed, toolarge = _c(c_split, spec, b"\x00\x00\x00\x01a\xff\xff\xff\xff")
    assert (msgs, consumed, toolarge) == ([b"a"], 5, True)


def test_endless_line_is_refused_without_waiting(c_split) -> None:
    spec = Lines(max_size=10)
    assert _c(c_split, spec, b"x" * 10) == ([], 0, False)
    assert _c(c_split, spec, b"x" * 11) == ([], 0, True)
    assert _c(c_split, spec, b"x" * 10 + b"\n") == ([b"x" * 10], 11, False)
