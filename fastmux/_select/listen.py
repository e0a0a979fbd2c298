"""SelectBackend, the listeners: the twin of csrc/listen.c.

Accepting with a budget, the reserve fd that sheds a backlog when the fd
table is full, and the back-off that keeps a failing listener from spinning.
"""

from __future__ import annotations

import errno
import os
import socket
import time

from .._constants import ACCEPT_BUDGET, EMFILE_BACKOFF_MS, EV_ACCEPT
from .internal import _EV_R, Core, _errno_of, _Listener

#: Seconds a listener stops accepting after EMFILE/ENFILE (and other
#: resource errors), so that an exhausted fd table cannot make us spin.
EMFILE_BACKOFF = EMFILE_BACKOFF_MS / 1000.0

# accept() errors that concern only the connection being accepted (it died
# in the backlog, or Linux passed a pending network error through accept):
# skip it and accept the next one.
_ACCEPT_SKIP = frozenset(
    getattr(errno, name)
    for name in ("ECONNABORTED", "EPROTO", "ENETDOWN", "ENOPROTOOPT",
                 "EHOSTDOWN", "ENONET", "EHOSTUNREACH", "EOPNOTSUPP",
                 "ENETUNREACH", "EPERM", "ECONNRESET")
    if hasattr(errno, name)
)
# accept() errors that mean the process or system is out of resources.
_ACCEPT_EXHAUSTED = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM))


class ListenPart(Core):
    """The listeners of SelectBackend (csrc/listen.c)."""

    # ----------------------------------------------------------- listeners

    def listener_add(self, fd: int, framing: int, max_connections: int) -> int:
        """Accept on `fd` (borrowed: never closed); returns the listener id."""
        spec = self._spec(framing)
        if spec is None:
            return -errno.EINVAL
        # A temporary socket object only to learn the family/type; detach()
        # hands the fd back without closing it.
        try:
            probe = socket.socket(fileno=fd)
        except OSError as exc:
            return -_errno_of(exc)
        family, type_, proto = probe.family, probe.type, probe.proto
        probe.detach()
        # Accepting until EAGAIN needs a non-blocking listener.
        os.set_blocking(fd, False)
        lid = self._lids.take()
        lis = _Listener(lid, fd, family, type_, proto, spec, max_connections)
        try:
            self._sel.register(fd, _EV_R, lis)
        except (KeyError, ValueError, OSError):
            self._lids.give(lid)
            return -errno.EEXIST
        lis.mask = _EV_R
        self._listeners[lid] = lis
        return lid

    def listener_set(self, lid: int, max_write_buffer: int, idle_timeout: float) -> None:
        """Options given to connections accepted from now on."""
        lis = self._listeners.get(lid)
        if lis is not None:
            lis.max_wbuf = max_write_buffer
            lis.idle = idle_timeout

    def listener_remove(self, lid: int) -> None:
        """Stop accepting on the listener; its fd is left open."""
        lis = self._listeners.pop(lid, None)
        if lis is None:
            return
        self._set_mask(lis, 0)
        lis.live = False
        self._ready_l.pop(lid, None)
        self._free_lids.append(lid)

    def _reenable_listeners(self, now: float) -> None:
        """End the back-offs that are over and serve those listeners this
        poll (the back-off half of fm__listeners_run)."""
        for lis in self._listeners.values():
            if lis.resume_at is not None and lis.resume_at <= now:
                lis.resume_at = None
                self._set_mask(lis, _EV_R)
                self._ready_l[lis.lid] = lis

    def _listener_io(self, lis: _Listener) -> None:
        """Accept until EAGAIN, at most ACCEPT_BUDGET, while the batch has
        room (fm__listener_io)."""
        # A short-lived socket object around the borrowed fd, detached in
        # `finally` so that nothing (not even an exception or the garbage
        # collector) can close the caller's listener.
        lsock = socket.socket(lis.family, lis.type, lis.proto, fileno=lis.fd)
        try:
            budget = ACCEPT_BUDGET
            while True:
                if budget <= 0 or self._room() <= 0:
                    # Stopped before EAGAIN: remember it, as the C core must.
                    self._ready_l[lis.lid] = lis
                    return
                budget -= 1
                try:
                    sock, _ = lsock.accept()
                except BlockingIOError:
                    return
                except OSError as exc:
                    code = _errno_of(exc)
                    if code in _ACCEPT_SKIP:
                        continue
                    if code in _ACCEPT_EXHAUSTED:  # as fm__listener_io
                        self._emfile += 1
                        if self._shed_backlog(lsock):
                            return
                    # Out of fds/memory, or the fd is no longer a listener:
                    # a level-triggered selector would report it again at
                    # once, so stop listening for a while instead of spinning.
                    lis.resume_at = time.monotonic() + EMFILE_BACKOFF
                    self._set_mask(lis, 0)
                    return
                self._on_accepted(lis, sock)
        finally:
            lsock.detach()

    @staticmethod
    def _open_reserve() -> int:
        try:
            return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return -1

    def _shed_backlog(self, lsock: socket.socket) -> bool:
        """Out of fds: close the reserve fd, accept and close every pending
        connection (the peers see an orderly close, not a hang), reopen the
        reserve.  False if there was no reserve fd (back off instead).
        As fm__emfile, which also counts the EMFILE (here the caller does)."""
        if self._reserve < 0:
            self._reserve = self._open_reserve()
            return False
        os.close(self._reserve)
        self._reserve = -1
        try:
            while True:
                try:
                    s, _ = lsock.accept()
                except InterruptedError:
                    continue
                except OSError as exc:
                    if _errno_of(exc) in _ACCEPT_SKIP:
                        continue
                    break
                s.close()
                self._rejected += 1
        finally:
            self._reserve = self._open_reserve()
        return True

    def _on_accepted(self, lis: _Listener, sock: socket.socket) -> None:
        """As fm__on_accepted."""
        if 0 <= lis.max_conns <= lis.open:
            # At max_connections: refuse by closing at once; the loop is
            # not told (FM_R_REJECTED is never reported).
            self._rejected += 1
            sock.close()
            return
        try:
            # Python's accept already gives a close-on-exec socket.
            sock.setblocking(False)
        except OSError:
            sock.close()
            return
        self._nodelay(sock)
        c = self._conn_new(sock, lis.spec, False)
        c.listener = lis
        lis.open += 1
        self._accepted += 1
        c.max_wbuf = lis.max_wbuf
        self._set_idle(c, lis.idle)
        self._emit(EV_ACCEPT, c.cid, lis.lid, c.fd)

