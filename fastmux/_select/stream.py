"""SelectBackend, a connection: the twin of csrc/stream.c.

Reading with a budget, framing, the write queue and its flush, the
watermarks and EV_DRAIN, half-close, close and abort.
"""

from __future__ import annotations

import errno
import os
import socket
import time
from typing import List, Optional, Tuple

from .._constants import (
    DISCARD_MAX,
    EV_CLOSED,
    EV_CONNECTED,
    EV_DRAIN,
    EV_EOF,
    EV_MSG,
    R_ERROR,
    R_IDLE,
    R_NONE,
    R_TOOLARGE,
    R_WBUFFULL,
    READ_BUDGET,
    READ_CHUNK,
)
from .._framing import Framing, split_scan
from .internal import _EV_R, _EV_W, Core, _Conn, _errno_of

_MSG_NOSIGNAL: int = getattr(socket, "MSG_NOSIGNAL", 0)


class StreamPart(Core):
    """The connections of SelectBackend (csrc/stream.c)."""

    # --------------------------------------------------------- connections

    @staticmethod
    def _nodelay(sock: socket.socket) -> None:
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass  # not TCP after all (e.g. SCTP); nothing to tune

    def _conn_new(self, sock: socket.socket, spec: Framing, connecting: bool) -> _Conn:
        """As fm__conn_new."""
        cid = self._cids.take()
        c = _Conn(cid, sock, spec, connecting)
        self._conns[cid] = c
        self._open += 1
        self._update(c)
        return c

    def _conn_get(self, cid: int) -> Optional[_Conn]:
        """As fm__conn_get."""
        c = self._conns.get(cid)
        return c if c is not None and c.live else None

    def conn_add(self, fd: int, framing: int, connecting: bool) -> int:
        """Take ownership of a connected (or connecting) socket fd."""
        spec = self._spec(framing)
        if spec is None:
            return -errno.EINVAL
        try:
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            return -_errno_of(exc)
        try:
            sock.setblocking(False)
            os.set_inheritable(fd, False)
        except OSError as exc:
            sock.detach()  # not ours after a failed add
            return -_errno_of(exc)
        self._nodelay(sock)
        try:
            c = self._conn_new(sock, spec, connecting)
        except (KeyError, ValueError, OSError):
            sock.detach()
            return -errno.EEXIST
        return c.cid

    def conn_set(self, cid: int, max_write_buffer: int, idle_timeout: float) -> None:
        c = self._conn_get(cid)
        if c is not None:
            c.max_wbuf = max_write_buffer
            self._set_idle(c, idle_timeout)

    def _set_idle(self, c: _Conn, idle: float) -> None:
        """As fm__idle_set."""
        c.idle = idle if idle > 0 else 0.0
        if c.idle:
            c.deadline = time.monotonic() + c.idle
            self._idle[c.cid] = c
        else:
            self._idle.pop(c.cid, None)

    def _update(self, c: _Conn) -> None:
        """Register exactly the interest that matters now, so that the
        level-triggered selector never reports an fd we would ignore."""
        want = 0
        if c.live:
            if c.connecting:
                want = _EV_W
            else:
                if not (c.paused or c.eof_seen or c.closing or c.err):
                    want = _EV_R
                if c.outbuf:
                    want |= _EV_W
        self._set_mask(c, want)

    def _release(self, c: _Conn) -> None:
        """Close the fd and make `c` a zombie (its id is freed later)."""
        self._set_mask(c, 0)
        c.live = False
        c.sock.close()
        c.inbuf = bytearray()
        c.framed.clear()
        c.outbuf = bytearray()
        self._open -= 1
        if c.listener is not None:
            c.listener.open -= 1
            c.listener = None
        self._ready.pop(c.cid, None)
        self._idle.pop(c.cid, None)

    def _conn_kill(self, c: _Conn, err: int, reason: int) -> None:
        """Close now and report EV_CLOSED(err, reason) (fm__conn_kill)."""
        if c.live:
            self._release(c)
            self._emit(EV_CLOSED, c.cid, err, reason)

    def _idle_sweep(self, now: float) -> None:
        """As fm__idle_sweep."""
        expired = [c for c in self._idle.values()
                   if not c.connecting and c.deadline <= now]
        for c in expired:
            self._conn_kill(c, 0, R_IDLE)

    # -------------------------------------------------------------- reading

    def _conn_process(self, c: _Conn) -> None:
        """Serve one connection from the ready list or the selector: an
        owed EV_DRAIN, then read (fm__conn_process)."""
        if not c.live:
            return
        if c.drain_due:
            # Owed by send() (fm__conn_process): before any read, and even
            # while paused; a closing connection gets no EV_DRAIN.
            if self._room() <= 0:
                self._ready[c.cid] = c
                return
            c.drain_due = False
            if not c.closing:
                self._emit(EV_DRAIN, c.cid, 0, 0)
        self._conn_read(c)

    def _conn_read(self, c: _Conn) -> None:
        """Read and frame within the budget, then EOF or the read error
        (fm__conn_read, fm__maybe_eof)."""
        if c.paused or c.closing or c.connecting:
            return
        if self._room() <= 0:
            self._ready[c.cid] = c
            return
        # A backlog of framed messages (left by a full batch) goes first,
        # and nothing is read until it is out: that bounds the input
        # buffered per connection.
        if (c.framed or c.too_large) and not self._frame_buffered(c):
            return
        more = False
        if not (c.eof_seen or c.err):
            more = self._conn_recv(c)
        if not self._frame_buffered(c):
            return
        if c.err:
            self._conn_kill(c, c.err, R_ERROR)
            return
        if c.eof_seen and not c.eof_done:
            if self._room() <= 0:
                self._ready[c.cid] = c
                return
            # Every complete message is out: drop the incomplete tail.
            c.inbuf = bytearray()
            c.scan = 0
            c.eof_done = True
            self._emit(EV_EOF, c.cid, 0, 0)
            return
        if more:
            self._ready[c.cid] = c

    def _conn_recv(self, c: _Conn) -> bool:
        """Read up to READ_BUDGET bytes; True if stopped by the budget (the
        connection may have more and goes on the ready list).  The recv step
        of fm__conn_read (fm__conn_recv), which frames after every chunk;
        here the budget is read first and framed once."""
        sock = c.sock
        buf = c.inbuf
        budget = READ_BUDGET
        got = 0
        more = False
        while True:
            want = min(READ_CHUNK, budget)
            try:
                # Into one reused buffer: recv(256 KiB) would allocate (and
                # with glibc often mmap and munmap) a large bytes per read.
                n = sock.recv_into(self._rview, want)
            except BlockingIOError:
                break
            except OSError as exc:
                c.err = _errno_of(exc)
                self._update(c)
                break
            self._reads += 1
            if not n:
                c.eof_seen = True
                self._update(c)
                break
            buf += self._rview[:n]
            got += n
            budget -= n
            if n < want:
                break  # a short read proves the socket is drained
            if budget <= 0:
                more = True
                break
        if got:
            self._bytes_in += got
            if c.idle:
                c.deadline = self._now + c.idle
        return more

    def _frame_buffered(self, c: _Conn) -> bool:
        """Emit the complete messages in c.framed, then c.inbuf (as
        fm__frame_buffered, which frames c->in).  False if
        the connection is done for this poll: it was closed, or the batch
        filled up (then it is on the ready list)."""
        if not c.framed and not c.too_large and c.inbuf:
            msgs, used, err, c.scan = split_scan(c.spec, c.inbuf, 0, c.scan)
            del c.inbuf[:used]
            c.framed.extend(msgs)
            c.too_large = err is not None
        framed = c.framed
        if framed:
            room = self._room()
            put = self._put
            cid = c.cid
            while framed and room > 0:
                put(EV_MSG, cid, 0, 0, framed.popleft())
                room -= 1
            c.msg_poll = self._polls
            if framed:
                self._ready[cid] = c
                return False
        if c.too_large:
            if c.msg_poll == self._polls:
                # As csrc/framing.c: the loop has not dispatched the messages
                # before it, and a handler may switch the framing on one of
                # them (an HTTP header, then Fixed(content_length)).  The
                # verdict waits for the next poll, with the rest buffered;
                # set_framing re-splits it, otherwise it is refused then.
                self._ready[cid] = c
                return False
            self._conn_kill(c, 0, R_TOOLARGE)
            return False
        return True

    def _unframe(self, c: _Conn) -> None:
        """Turn undelivered messages back into raw input, in front of inbuf,
        so they can be re-framed (new framing, pushed-back bytes)."""
        if c.framed:
            raw = b"".join(c.spec._unsplit(m) for m in c.framed)
            c.inbuf[:0] = raw
            c.framed.clear()
        c.too_large = False

    def _make_ready(self, c: _Conn) -> None:
        # A paused connection waits for resume(), which readies it anyway;
        # readying it now would only cost the loop one idle, non-blocking poll.
        if not c.paused:
            self._ready[c.cid] = c

    def pause(self, cid: int) -> None:
        c = self._conn_get(cid)
        if c is not None and not c.paused:
            c.paused = True
            if not c.drain_due:  # an owed EV_DRAIN still goes out
                self._ready.pop(cid, None)
            self._update(c)

    def resume(self, cid: int) -> None:
        """Read again; buffered bytes are framed by the next poll even if
        no new byte arrives (no edge would come for them)."""
        c = self._conn_get(cid)
        if c is not None and not c.closing:
            c.paused = False
            self._update(c)
            self._ready[cid] = c

    def set_framing(self, cid: int, framing: int) -> None:
        """Frame the bytes not yet framed with `framing` from now on."""
        c = self._conn_get(cid)
        spec = self._spec(framing)
        if c is not None and spec is not None and not c.closing:
            self._unframe(c)
            c.spec = spec
            c.scan = 0
            self._make_ready(c)

    def pushback(self, cid: int, data: bytes, reemit_eof: bool) -> None:
        """Put `data` back in front of the unframed input and re-frame it."""
        c = self._conn_get(cid)
        if c is None or c.closing:
            return
        self._unframe(c)
        c.inbuf[:0] = data
        c.scan = 0
        if reemit_eof and c.eof_done:
            c.eof_done = False
        self._make_ready(c)

    # -------------------------------------------------------------- writing

    def send_many(self, items: List[Tuple[int, bytes]]) -> List[int]:
        """``send`` for each ``(cid, data)`` (the loop's end-of-iteration
        flush); the results, in order."""
        return [self.send(cid, data) for cid, data in items]

    def send(self, cid: int, data: bytes) -> int:
        """Queue `data` and try to send it now; returns the bytes still
        queued, or -errno if the connection cannot send any more."""
        c = self._conns.get(cid)
        if c is None:
            return -errno.EBADF
        if not c.live or c.closing or c.shut_req:
            return -errno.EPIPE
        if not data:
            return len(c.outbuf)
        was_empty = not c.outbuf
        c.outbuf += data
        # The watermark is checked before the inline send: the caller has
        # counted these bytes as queued (and may be waiting for EV_DRAIN
        # because of them) even if the send below takes most of them.
        if len(c.outbuf) > c.high:
            c.over_high = True
        if was_empty and not c.connecting:
            err = self._flush(c)
            if err:
                return -err
        if 0 < c.max_wbuf < len(c.outbuf):
            # The peer does not read: drop the output and close.
            self._conn_kill(c, 0, R_WBUFFULL)
            return -errno.ENOBUFS
        self._update(c)
        return len(c.outbuf)

    def _flush(self, c: _Conn) -> int:
        """Send queued output until the socket is full; returns the errno
        that closed the connection, or 0."""
        sock = c.sock
        out = c.outbuf
        while out:
            try:
                n = sock.send(out, _MSG_NOSIGNAL)
            except BlockingIOError:
                break
            except OSError as exc:
                code = _errno_of(exc)
                self._conn_kill(c, code, R_ERROR)
                return code
            self._writes += 1
            self._bytes_out += n
            short = n < len(out)
            del out[:n]
            if short:
                break  # the send buffer is full; wait for writability
        self._after_flush(c)
        return 0

    def _after_flush(self, c: _Conn) -> None:
        """As fm__after_flush."""
        if c.over_high and len(c.outbuf) <= c.low:
            c.over_high = False
            if not self._in_poll:
                # From send(): owed, delivered by the next poll (see _conn_process).
                c.drain_due = True
                self._ready[c.cid] = c
            elif not c.closing:  # as fm__after_flush: none while closing
                self._emit(EV_DRAIN, c.cid, 0, 0)
        if not c.outbuf and not c.connecting:
            if c.closing:
                self._finish_close(c)
                return
            if c.shut_req and not c.shut_done:
                c.shut_done = True
                try:
                    c.sock.shutdown(socket.SHUT_WR)
                except OSError:
                    pass  # already reset: the read side reports it
        self._update(c)

    def _on_connected(self, c: _Conn) -> None:
        err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._conn_kill(c, err, R_ERROR)
            return
        c.connecting = False
        if c.idle:
            c.deadline = self._now + c.idle
        self._emit(EV_CONNECTED, c.cid, 0, 0)
        if c.outbuf:
            self._flush(c)
        else:
            self._after_flush(c)

    def set_write_limits(self, cid: int, high: int, low: int) -> None:
        c = self._conn_get(cid)
        if c is not None:
            c.high = high
            c.low = low
            if len(c.outbuf) > high:
                c.over_high = True

    def write_buffer_size(self, cid: int) -> int:
        c = self._conn_get(cid)
        return len(c.outbuf) if c is not None else -errno.EBADF

    # -------------------------------------------------------------- closing

    def close(self, cid: int) -> None:
        """Stop reading, flush the queue, then close (EV_CLOSED follows)."""
        c = self._conn_get(cid)
        if c is None or c.closing:
            return
        c.closing = True
        c.inbuf = bytearray()
        c.framed.clear()
        c.too_large = False
        self._ready.pop(cid, None)
        if c.outbuf or c.connecting:
            self._update(c)  # read interest off; flushed on writability
        else:
            self._finish_close(c)

    def _finish_close(self, c: _Conn) -> None:
        """As fm__finish_close."""
        self._discard_input(c)
        self._conn_kill(c, 0, R_NONE)

    def _discard_input(self, c: _Conn) -> None:
        """Read and drop unread input before a graceful close (at most
        DISCARD_MAX bytes, so that a fire-hose peer cannot hold the loop):
        unread input would make close() send a RST, which can destroy the
        output just flushed before the peer reads it (fm__discard_input)."""
        left = DISCARD_MAX
        try:
            while left > 0:
                data = c.sock.recv(min(READ_CHUNK, left))
                if not data:
                    break
                left -= len(data)
        except OSError:
            pass  # BlockingIOError (drained) or a reset: nothing to save

    def abort(self, cid: int) -> None:
        """Close now, dropping queued output; EV_CLOSED(0, R_NONE) follows."""
        c = self._conn_get(cid)
        if c is not None:
            self._conn_kill(c, 0, R_NONE)

    def shutdown(self, cid: int) -> None:
        """shutdown(SHUT_WR) once the queue is empty; later sends fail."""
        c = self._conn_get(cid)
        if c is None or c.closing or c.shut_req:
            return
        c.shut_req = True
        if not c.outbuf and not c.connecting:
            self._after_flush(c)

