"""Every framer through real sockets on both backends.

The same byte stream is delivered coalesced (many messages in one send),
split in two at every byte boundary (one connection per boundary, the first
part read by the server before the second is sent), and one byte at a time.
The messages must be the same as the reference framer's (``_framing.split``)
every time: on the epoll backend that compares the C framers with the model.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import Factory, Peer, Recorder, pattern, run_until

import fastmux
from fastmux import Delimiter, Fixed, LengthPrefixed, Lines, Raw
from fastmux._framing import split


def _lp_case(hs, order):
    spec = LengthPrefixed(hs, order)
    msgs = [b"", b"abc", b"\n\x00\xff" * 3, b"z"]
    stream = b"".join(len(m).to_bytes(hs, order) + m for m in msgs)
    return pytest.param(spec, stream, msgs, id=f"length{hs}{order[0]}")


CASES = [
    pytest.param(Lines(), b"one\ntwo\r\n\n\xff\x00last\n", [b"one", b"two\r", b"", b"\xff\x00last"], id="lines"),
    pytest.param(Delimiter(b"\r\n\r\n"), b"GET / HTTP/1.1\r\nA: b\r\n\r\n\r\n\r\nx\r\n\r\r\n\r\n",
                 [b"GET / HTTP/1.1\r\nA: b", b"", b"x\r\n\r"], id="delimiter"),
    pytest.param(Delimiter(b"|"), b"a|bc||d|", [b"a", b"bc", b"", b"d"], id="delimiter1"),
    *[_lp_case(hs, order) for hs in (1, 2, 4, 8) for order in ("big", "little")],
    pytest.param(Fixed(3), b"abcdefghi\x00\n\r", [b"abc", b"def", b"ghi", b"\x00\n\r"], id="fixed3"),
    pytest.param(Fixed(1), b"xyz", [b"x", b"y", b"z"], id="fixed1"),
    pytest.param(Raw(), b"raw bytes \x00\xff as they come", None, id="raw"),
]


def check(handler, spec, stream, expected, repeat=1):
    if expected is None:  # Raw: only the concatenation is specified
        assert handler.data == stream * repeat
        assert all(handler.messages), "Raw never delivers an empty chunk"
    else:
        assert handler.messages == expected * repeat


def complete(handler, stream, expected, repeat=1):
    if expected is None:
        return len(handler.data) >= len(stream) * repeat
    return len(handler.messages) >= len(expected) * repeat


@pytest.mark.parametrize("spec, stream, expected", CASES)
def test_oracle_agrees_with_cases(spec, stream, expected):
    msgs, consumed = split(spec, stream)
    assert consumed == len(stream)
    if expected is not None:
        assert msgs == expected


@pytest.mark.parametrize("spec, stream, expected", CASES)
def test_coalesced(loop, peers, spec, stream, expected):
    fac = Factory()
    server = loop.listen(("127.0.0.1", 0), fac, framing=spec)
    p = peers.connect(server.address)
    p.send(stream * 50)  # many messages in one send, one read
    run_until(loop, lambda: fac.made and complete(fac[0], stream, expected, 50), peers=[p])
    check(fac[0], spec, stream, expected, 50)


@pytest.mark.parametrize("spec, stream, expected", CASES)
def test_split_at_every_byte_boundary(loop, peers, spec, stream, expected):
    fac = Factory()
    server = loop.listen(("127.0.0.1", 0), fac, framing=spec)
    cuts = list(range(1, len(stream)))
    ps = [peers.connect(server.address) for _ in cuts]
    run_until(loop, lambda: len(fac.opened) == len(ps), what="all accepted")
    for p, cut in zip(ps, cuts):
        p.send(stream[:cut])
    # The server has read every first part before any second part is sent.
    first = sum(cuts)
    run_until(loop, lambda: loop.stats()["bytes_in"] >= first, peers=ps, what="first parts read")
    assert loop.stats()["bytes_in"] == first
    for p, cut in zip(ps, cuts):
        p.send(stream[cut:])
    run_until(loop, lambda: all(complete(h, stream, expected) for h in fac.made), peers=ps)
    for h in fac.made:
        check(h, spec, stream, expected)


@pytest.mark.parametrize("spec, stream, expected", CASES)
def test_one_byte_at_a_time(loop, peers, spec, stream, expected):
    fac = Factory()
    server = loop.listen(("127.0.0.1", 0), fac, framing=spec)
    p = peers.connect(server.address)
    for i in range(len(stream)):
        p.send(stream[i:i + 1])
        run_until(loop, lambda: loop.stats()["bytes_in"] >= i + 1, peers=[p])
    run_until(loop, lambda: fac.made and complete(fac[0], stream, expected), peers=[p])
    check(fac[0], spec, stream, expected)


def incomplete_tail(spec):
    """Non-empty bytes that start a message but never finish it."""
    if isinstance(spec, LengthPrefixed):
        return (5).to_bytes(spec.header_size, spec.byteorder) + b"ab"
    if isinstance(spec, Delimiter):
        return b"partial" + spec.sep[:-1]
    return b"x" * (spec.size - 1)


@pytest.mark.parametrize("spec, stream, expected",
                         [c for c in CASES if c.id not in ("raw", "fixed1")])
def test_incomplete_tail_discarded_at_eof(loop, peers, spec, stream, expected):
    tail = incomplete_tail(spec)
    assert tail and split(spec, stream + tail) == (expected, len(stream))
    fac = Factory()
    server = loop.listen(("127.0.0.1", 0), fac, framing=spec)
    p = peers.connect(server.address)
    p.send(stream + tail)
    p.shutdown_write()
    run_until(loop, lambda: fac.made and fac[0].closed, peers=[p])
    h = fac[0]
    assert h.messages == expected
    assert [e[0] for e in h.events] == ["open"] + ["message"] * len(expected) + ["eof", "close"]
    h.assert_closed_once(None)


# --- random streams, random cuts, compared with the model --------------------

def _spec_strategy():
    return st.one_of(
        st.builds(Delimiter, st.binary(min_size=1, max_size=3)),
        st.builds(LengthPrefixed, st.sampled_from([1, 2, 4, 8]), st.sampled_from(["big", "little"])),
        st.builds(Fixed, st.integers(1, 7)),
    )


@settings(max_examples=20, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(spec=_spec_strategy(), msgs=st.lists(st.binary(max_size=40), max_size=6),
       cuts=st.lists(st.integers(0, 400), max_size=5))
def test_random_streams_match_model(backend, spec, msgs, cuts):
    if isinstance(spec, Delimiter):
        msgs = [m.replace(spec.sep, b"") for m in msgs]
        stream = b"".join(m + spec.sep for m in msgs)
    elif isinstance(spec, Fixed):
        stream = b"".join(msgs)
        stream = stream[: len(stream) - len(stream) % spec.size]
    else:
        stream = b"".join(spec._unsplit(m) for m in msgs)
    expected, consumed = split(spec, stream)
    assert consumed == len(stream)
    cuts = sorted({c for c in cuts if 0 < c < len(stream)}) + [len(stream)]
    with fastmux.Loop(backend=backend) as loop:
        fac = Factory(Recorder)
        server = loop.listen(("127.0.0.1", 0), fac, framing=spec)
        p = Peer.connect(server.address)
        try:
            prev = 0
            for cut in cuts:
                p.send(stream[prev:cut])
                run_until(loop, lambda: loop.stats()["bytes_in"] >= cut, peers=[p])
                prev = cut
            run_until(loop, lambda: fac.made and len(fac[0].messages) >= len(expected), peers=[p])
            assert fac[0].messages == expected
        finally:
            p.close()


# --- set_framing on bytes of the same read: the README's HTTP pattern ---------

HTTP_HEAD = Delimiter(b"\r\n\r\n", max_size=8192)


class HttpLike(Recorder):
    """Headers by delimiter, then Fixed(Content-Length) for the body."""

    in_body = False

    def on_message(self, conn, data):
        super().on_message(conn, data)
        self.in_body = not self.in_body
        if self.in_body:
            conn.set_framing(Fixed(int(data.split(b"Content-Length: ")[1])))
        else:
            conn.set_framing(HTTP_HEAD)


@pytest.mark.parametrize("body_size, requests", [(16 * 1024, 3), (2 * 1024 * 1024, 1)],
                         ids=["16KiB", "2MiB"])
def test_http_header_and_large_body_in_one_write(loop, peers, body_size, requests):
    """Header and a body larger than the header framing's max_size, sent in
    one write (so read together): the switch to Fixed(n) in on_message
    applies to the body, which is not judged by the old max_size."""
    fac = Factory(HttpLike)
    server = loop.listen(("127.0.0.1", 0), fac, framing=HTTP_HEAD)
    p = peers.connect(server.address)
    expected = []
    for k in range(requests):
        body = pattern(body_size, seed=k)
        expected += [b"POST /%d HTTP/1.1\r\nContent-Length: %d" % (k, body_size), body]
    p.send(b"".join(m + (b"\r\n\r\n" if i % 2 == 0 else b"") for i, m in enumerate(expected)))
    run_until(loop, lambda: fac.made and (len(fac[0].messages) == len(expected) or fac[0].closed),
              peers=[p], what="every request")
    h = fac[0]
    assert not h.closed, h.close_exc
    assert [len(m) for m in h.messages] == [len(m) for m in expected]
    assert h.messages == expected


def test_oversize_after_a_message_still_refused(loop, peers):
    """Without a switch the same input is refused: the message before it is
    delivered, then on_close gets MessageTooLarge."""
    fac = Factory(Recorder)
    server = loop.listen(("127.0.0.1", 0), fac, framing=HTTP_HEAD)
    p = peers.connect(server.address)
    p.send(b"GET / HTTP/1.1\r\n\r\n" + b"x" * (16 * 1024))
    run_until(loop, lambda: fac.made and fac[0].closed, peers=[p])
    assert fac[0].messages == [b"GET / HTTP/1.1"]
    fac[0].assert_closed_once(fastmux.MessageTooLarge)


def test_long_line_in_pieces_is_searched_once(backend, loop, peers, monkeypatch):
    """A 4 MiB line arrives over many reads (at most READ_BUDGET bytes per
    poll, so at least 16): each read resumes the separator search where the
    last one stopped (the scan offset of csrc/framing.c, which the select
    backend keeps per connection too), so the framer searches about 4 MiB in
    all.  Searching the whole unframed tail again on every read would be
    quadratic: 16 reads of 256 KiB alone search over 34 MiB.  On the select
    backend the bytes each framer call is asked to search are counted; on
    both, the line must arrive whole."""
    from fastmux._constants import READ_BUDGET
    from fastmux._select import stream

    n = 4 * 1024 * 1024
    searched: list[int] = []
    if backend == "select":
        real = stream.split_scan

        def counting(spec, buf, start=0, scan=0):
            searched.append(len(buf) - start - scan)
            return real(spec, buf, start, scan)

        monkeypatch.setattr(stream, "split_scan", counting)
    fac = Factory()
    server = loop.listen(("127.0.0.1", 0), fac, framing=Lines(max_size=2 * n))
    p = peers.connect(server.address)
    line = pattern(n).replace(b"\n", b"-")
    for i in range(0, n, 64 * 1024):
        p.send(line[i:i + 64 * 1024])
    p.send(b"\nafter\n")
    run_until(loop, lambda: fac.made and len(fac[0].messages) == 2, peers=[p], what="the line")
    assert fac[0].messages == [line, b"after"]
    if backend == "select":
        assert len(searched) >= n // READ_BUDGET  # many reads, many framer calls
        assert sum(searched) < 2 * n, f"{len(searched)} calls searched {sum(searched)} bytes"
