"""Multi-process serving: one supervisor, N worker processes, one port.

``start()`` binds the address once (so port 0 becomes a real port and
``pool.address`` can tell it), then forks ONE process, the supervisor, which
forks the workers and restarts those that die.  Each worker makes its own Loop
(a loop inherited across fork is unusable) and listens:

* TCP: every worker binds the supervisor's port again with ``SO_REUSEPORT``
  and the kernel spreads new connections over the workers.  The supervisor's
  own socket is bound but never listens, so it takes no connections; it only
  holds the port while workers come and go.
* Unix socket paths: the supervisor binds and listens once; the workers
  accept on that inherited listener (``loop.listen(None, ..., sock=...)``).
  Linux has no ``SO_REUSEPORT`` for Unix sockets, so the kernel cannot spread
  connections at arrival: every waiting worker is woken and the first to
  call accept() takes what is queued.  A busy worker takes nothing, but a
  burst queued before the workers wake mostly goes to one of them.  (Not
  ``EPOLLEXCLUSIVE``: measured here, it wakes the first waiting worker in
  registration order, and connections arriving one at a time then all went
  to one worker.)  For an even spread over many workers, prefer TCP.

Why a supervisor process and not a supervisor thread: a process that forks
while it runs more than one thread can deadlock the child (a lock held by
another thread at fork stays locked forever; Python 3.12+ warns about it).
The supervisor process runs one thread, so every fork of a worker -- the
first ones and each restart -- is made from a single-threaded process, and
the process that called ``start()`` starts no thread and forks only once,
there and then (call ``start()`` before starting threads of your own).  The
calling process talks to the supervisor over a socketpair (the "control
link"): the supervisor reports the live workers' pids and the restart count
on it, and closing it -- ``stop()``, or the calling process dying -- stops the
supervisor.  The supervisor logs worker exits (with their exit status) and
restarts on the ``fastmux`` logger, with the logging set-up it inherited.

Each worker is tied to the supervisor by a socketpair (the "lifeline"), which
the worker's loop watches like any connection.  The worker reports "ready" on
it once it listens; when the supervisor closes its end -- on ``stop()``, or
because the supervisor process died, however it died -- the worker drains its
connections (``loop.shutdown(shutdown_timeout)``) and exits.  So no worker
outlives its supervisor by more than ``shutdown_timeout``, and the supervisor
kills whatever is left after that.  A worker that dies is restarted (with a
back-off if it keeps dying at once).  The same chain holds one level up: the
supervisor stops when the control link closes.

``workers=1`` runs in-process: one loop in a background thread, no fork.
"""

from __future__ import annotations

import logging
import os
import selectors
import signal
import socket
import sys
import threading
import time
from typing import Any, Dict, List, Optional

from ._checks import check_pool_args
from ._framing import Framing
from ._loop import Connection, Handler, HandlerFactory, Loop
from ._sockets import Address, bound_socket, unix_inode, unlink_socket_path

__all__ = ["WorkerPool", "serve"]

#: Default time a stopping worker gets to flush and close its connections.
DEFAULT_SHUTDOWN_TIMEOUT = 10.0

#: How long start() waits for every worker to report that it listens.
START_TIMEOUT = 30.0

_RESERVED_OPTIONS = ("reuse_port", "sock")

_READY = b"R"
_ERROR = b"E"

#: Extra time the calling process gives the supervisor to exit after its own
#: deadline (shutdown_timeout + 2 s to kill stuck workers) before killing it.
_SUPERVISOR_GRACE = 5.0

logger = logging.getLogger("fastmux")


def _default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


class _Worker:
    """The supervisor's record of one worker process."""

    __slots__ = ("pid", "slot", "sock", "ready", "error", "started", "exited", "status")

    def __init__(self, pid: int, slot: int, sock: socket.socket) -> None:
        self.pid = pid
        self.slot = slot
        self.sock = sock  # the supervisor's end of the lifeline
        self.ready = False
        self.error = b""
        self.started = time.monotonic()
        self.exited = False
        self.status: Optional[int] = None  # os.waitpid's status once reaped


class WorkerPool:
    """Serve `address` from `workers` processes, each running its own Loop.

    `address` is ``(host, port)`` (port 0: any free port; ``pool.address``
    tells which) or a Unix socket path.  `handler_factory`, `framing`,
    `backend` and `listen_options` (``backlog``, ``max_connections``,
    ``idle_timeout``, ``max_write_buffer``) mean what they mean for
    ``Loop.listen`` and ``Loop(backend)``, in every worker.  `workers`
    defaults to the number of CPUs this process may run on; ``workers=1``
    serves in-process from a background thread.  `shutdown_timeout` is how
    long ``stop()`` lets connections drain before they are aborted and
    worker processes killed.

    Workers are forked, so the handler factory needs no pickling and sees
    the module state of the moment ``start()`` (or a restart) forked it."""

    def __init__(self, address: Address, handler_factory: HandlerFactory, *,
                 framing: Optional[Framing] = None, workers: Optional[int] = None,
                 backend: str = "auto",
                 shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT,
                 **listen_options: Any) -> None:
        for name in _RESERVED_OPTIONS:
            if name in listen_options:
                raise TypeError(f"WorkerPool sets {name!r} itself")
        check_pool_args(address, handler_factory, framing, backend, listen_options)
        if workers is None:
            workers = _default_workers()
        if not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be an int >= 1, got {workers!r}")
        if shutdown_timeout < 0:
            raise ValueError("shutdown_timeout must be >= 0")
        if workers > 1 and not hasattr(os, "fork"):
            raise RuntimeError("workers > 1 needs os.fork (POSIX)")
        self._requested_address = address
        self._factory = handler_factory
        self._framing = framing
        self.workers = workers
        self.backend = backend
        self.shutdown_timeout = float(shutdown_timeout)
        self._listen_options = listen_options
        self._address: Optional[Address] = None
        self._started = False
        self._stop_requested = False
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None
        self._restarts = 0
        # in-process (workers == 1)
        self._loop: Optional[Loop] = None
        # multi-process
        self._sock: Optional[socket.socket] = None
        self._unix_path: Optional[str] = None
        self._unix_ino: Optional[int] = None
        self._children: Dict[int, _Worker] = {}  # slot -> worker
        self._wake_r: Optional[socket.socket] = None
        self._wake_w: Optional[socket.socket] = None
        self._error: Optional[BaseException] = None
        # In the calling process: the supervisor and what it last reported.
        self._sup_pid = 0
        self._ctl: Optional[socket.socket] = None
        self._ctl_buf = b""
        self._reported = False
        self._start_error = ""
        self._pids: List[int] = []
        # In the supervisor process: its end of the control link (also its
        # wake-up: readable on a stop) and the report not yet sent on it.
        self._up: Optional[socket.socket] = None
        self._unsent = b""
        self._pending: Optional[bytes] = None

    # -- public --------------------------------------------------------------

    @property
    def address(self) -> Address:
        """The bound address (the real port when 0 was asked for).
        RuntimeError before ``start()``."""
        if self._address is None:
            raise RuntimeError("the pool has not been started")
        return self._address

    @property
    def pids(self) -> List[int]:
        """The pids of the live workers (``[os.getpid()]`` for workers=1)."""
        if self.workers == 1:
            return [os.getpid()] if self._started and not self._done.is_set() else []
        with self._lock:
            self._pump(0.0)
            return list(self._pids)

    @property
    def restarts(self) -> int:
        """How many workers were restarted after they died."""
        if self.workers > 1:
            with self._lock:
                self._pump(0.0)
        return self._restarts

    def start(self) -> "WorkerPool":
        """Bind, start the workers and return once every one of them is
        listening.  Raises OSError if the address cannot be bound and
        RuntimeError if a worker fails to start (the others are stopped);
        RuntimeError if called twice."""
        if self._started:
            raise RuntimeError("the pool was already started")
        self._started = True
        try:
            if self.workers == 1:
                self._start_in_process()
            else:
                self._start_processes()
        except BaseException:
            self._done.set()
            raise
        return self

    def stop(self) -> None:
        """Stop accepting, let connections drain for up to
        ``shutdown_timeout`` seconds, then abort them (kill the worker
        processes).  Returns when every worker is gone.  Idempotent; may be
        called from any thread."""
        if not self._started:
            self._stop_requested = True
            self._done.set()
            return
        self._request_stop()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        if self._sup_pid:
            self._stop_supervisor()
        self._done.wait()

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Block until the pool has stopped (or `timeout` seconds pass);
        return True if it has stopped."""
        if self._sup_pid:
            done = self._wait_supervisor(timeout)
        else:
            done = self._done.wait(timeout)
        if done and self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        return done

    def __enter__(self) -> "WorkerPool":
        if not self._started:
            self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "stopped" if self._done.is_set() else ("running" if self._started else "new")
        return f"<fastmux.WorkerPool {self._address!r} workers={self.workers} {state}>"

    # -- stopping ------------------------------------------------------------

    def _request_stop(self) -> None:
        """Ask the pool to stop and return at once (signal-handler safe)."""
        self._stop_requested = True
        if self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._loop.stop)
            except RuntimeError:
                pass  # already closed
        w = self._wake_w
        if w is not None:
            try:
                w.send(b"x")
            except OSError:
                pass

    # -- workers == 1: in-process ----------------------------------------------

    def _start_in_process(self) -> None:
        loop = Loop(self.backend)
        try:
            server = loop.listen(self._requested_address, self._factory,
                                 framing=self._framing, **self._listen_options)
        except BaseException:
            loop.close()
            raise
        self._address = server.address
        self._loop = loop
        self._thread = threading.Thread(target=self._run_in_process, name="fastmux-pool",
                                        daemon=True)
        self._thread.start()

    def _run_in_process(self) -> None:
        loop = self._loop
        assert loop is not None
        try:
            if not self._stop_requested:
                loop.run()
            loop.shutdown(self.shutdown_timeout)
        except BaseException as e:  # reported through the exception handler
            self._error = e
        finally:
            try:
                loop.close()
            finally:
                self._done.set()

    # -- workers > 1: the calling process ----------------------------------------

    def _start_processes(self) -> None:
        address = self._requested_address
        if isinstance(address, (str, bytes, os.PathLike)):
            sock, unix_path = bound_socket(address, reuse_port=False)
            try:
                sock.listen(int(self._listen_options.get("backlog", 1024)))
            except BaseException:
                sock.close()
                raise
            self._unix_path = unix_path
            self._unix_ino = unix_inode(unix_path)
        else:
            # Bound, never listening: it holds the port (port 0 -> a real
            # one) and takes no connections; the workers' listeners do.
            sock, _ = bound_socket(address, reuse_port=True)
        self._sock = sock
        name = sock.getsockname()
        self._address = name if self._unix_path is not None else tuple(name)
        # Output buffered now would be written twice, by us and by a child.
        for stream in (sys.stdout, sys.stderr):
            try:
                if stream is not None:
                    stream.flush()
            except (OSError, ValueError):
                pass
        ctl, up = socket.socketpair()
        try:
            pid = os.fork()
        except BaseException:
            ctl.close()
            up.close()
            sock.close()
            self._sock = None
            if self._unix_path:
                unlink_socket_path(self._unix_path, self._unix_ino)
            raise
        if pid == 0:  # the supervisor; never returns
            code = 1
            try:
                ctl.close()
                code = self._supervisor_main(up)
            except BaseException:
                try:
                    import traceback
                    traceback.print_exc()
                except BaseException:
                    pass
            finally:
                os._exit(code)
        # The supervisor holds the listening socket from now on.
        up.close()
        sock.close()
        self._sock = None
        self._sup_pid = pid
        self._ctl = ctl
        # Wait for the first report: every worker listens, or one failed.
        deadline = time.monotonic() + START_TIMEOUT + _SUPERVISOR_GRACE
        with self._lock:
            while not self._reported and not self._start_error and not self._done.is_set():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self._start_error = (f"fastmux workers not listening after "
                                         f"{START_TIMEOUT}s")
                    break
                self._pump(min(remaining, 0.1))
        if self._start_error or not self._reported:
            error = self._start_error or "the fastmux supervisor exited while starting"
            self._stop_supervisor()
            raise RuntimeError(error)

    def _pump(self, timeout: float) -> None:
        """Read what the supervisor reported, waiting up to `timeout` seconds
        for it; on EOF, reap the supervisor.  Called with the lock held."""
        ctl = self._ctl
        if ctl is None:
            return
        data = b""
        try:
            ctl.settimeout(timeout if timeout > 0 else 0.0)
            while True:
                chunk = ctl.recv(65536)
                data += chunk
                if not chunk:
                    break
                ctl.settimeout(0.0)
        except (BlockingIOError, InterruptedError, TimeoutError):
            chunk = b"-"
        except OSError:
            chunk = b""
        self._ctl_buf += data
        *lines, self._ctl_buf = self._ctl_buf.split(b"\n")
        for line in lines:
            kind, _, rest = line.partition(b" ")
            if kind == b"P":  # P <restarts> <pid> <pid> ...
                fields = rest.split()
                self._restarts = int(fields[0])
                self._pids = [int(f) for f in fields[1:]]
                self._reported = True
            elif kind == b"E":  # E <why a worker failed to start>
                self._start_error = rest.decode(errors="replace")
        if not chunk:
            self._supervisor_gone()

    def _supervisor_gone(self) -> None:
        """The control link closed: reap the supervisor, clean up, done."""
        if self._ctl is not None:
            self._ctl.close()
            self._ctl = None
        status: Optional[int] = None
        try:
            _, status = os.waitpid(self._sup_pid, 0)
        except ChildProcessError:
            pass
        self._pids = []
        if self._unix_path:
            unlink_socket_path(self._unix_path, self._unix_ino)
        if not self._stop_requested and self._reported and self._error is None:
            self._error = RuntimeError(
                f"the fastmux supervisor {self._sup_pid} exited ({_describe(status)})")
            logger.error("%s; the pool has stopped", self._error)
        self._done.set()

    def _wait_supervisor(self, timeout: Optional[float]) -> bool:
        """Wait up to `timeout` seconds (None: no limit) for the supervisor
        to exit; True if it has."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._done.is_set():
            remaining = 0.1 if deadline is None else deadline - time.monotonic()
            if remaining <= 0:
                return False
            # Short slices: other threads may want the lock (pids, stop()).
            with self._lock:
                if not self._done.is_set():
                    self._pump(min(remaining, 0.1))
        return True

    def _stop_supervisor(self) -> None:
        """Close the control link (the supervisor stops its workers and
        exits) and wait for the supervisor; kill it if it overstays."""
        with self._lock:
            if self._ctl is not None:
                try:
                    self._ctl.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
        limit = self.shutdown_timeout + 2.0 + _SUPERVISOR_GRACE
        if not self._wait_supervisor(limit):
            logger.error("the fastmux supervisor %d did not stop within %.1fs; killing it",
                         self._sup_pid, limit)
            try:
                os.kill(self._sup_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self._wait_supervisor(None)

    # -- workers > 1: the supervisor process -------------------------------------

    def _supervisor_main(self, up: socket.socket) -> int:
        """Runs in the forked supervisor (one thread): start the workers,
        report, restart the ones that die until the control link closes.
        Returns the exit code."""
        self._lock = threading.Lock()  # the parent's may have been held at fork
        self._ctl = None
        self._thread = None
        # Ctrl+C reaches the whole process group: the calling process decides.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # we reap, with statuses
        try:
            signal.set_wakeup_fd(-1)
        except ValueError:
            pass
        up.setblocking(False)
        self._up = up
        # Readable when the calling process stops us; _worker_main closes it.
        self._wake_r = up
        try:
            for slot in range(self.workers):
                self._spawn(slot)
            self._await_ready()
        except BaseException as e:
            why = str(e) if isinstance(e, RuntimeError) else repr(e)
            self._report(_ERROR + b" " + why.replace("\n", " ").encode(errors="replace"))
            self._flush_report(block=True)
            try:
                self._shutdown_children()
            finally:
                self._close_supervisor()
            return 1
        for w in self._children.values():
            logger.info("fastmux worker %d (slot %d) started", w.pid, w.slot)
        self._report_pids()
        self._supervise()
        return 0 if self._error is None else 1

    def _report_pids(self) -> None:
        live = [w.pid for w in self._children.values() if not w.exited and w.pid > 0]
        self._report(b"P %d %s" % (self._restarts, " ".join(map(str, live)).encode()))

    def _report(self, line: bytes) -> None:
        """Send `line` to the calling process.  Each report is a snapshot, so
        one the calling process has not made room for yet replaces the one
        before it (a line already partly sent is finished first)."""
        self._pending = line + b"\n"
        self._flush_report()

    def _flush_report(self, block: bool = False) -> None:
        up = self._up
        if up is None:
            return
        try:
            if block:
                up.settimeout(2.0)
            while self._unsent or self._pending:
                if not self._unsent:
                    self._unsent, self._pending = self._pending or b"", None
                self._unsent = self._unsent[up.send(self._unsent):]
        except (BlockingIOError, InterruptedError, TimeoutError):
            pass
        except OSError:
            self._unsent, self._pending = b"", None  # nobody listens any more
        finally:
            if block:
                try:
                    up.setblocking(False)
                except OSError:
                    pass

    def _drain_wake(self) -> None:
        """Read the control link; EOF (or an error) is a stop request."""
        assert self._wake_r is not None
        while True:
            try:
                data = self._wake_r.recv(4096)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:
                self._stop_requested = True
                return

    def _spawn(self, slot: int) -> None:
        parent_end, child_end = socket.socketpair()
        try:
            pid = os.fork()
        except BaseException:
            parent_end.close()
            child_end.close()
            raise
        if pid == 0:  # the worker; never returns
            code = 1
            try:
                parent_end.close()
                code = self._worker_main(child_end)
            except BaseException:
                try:
                    import traceback
                    traceback.print_exc()
                except BaseException:
                    pass
            finally:
                os._exit(code)
        child_end.close()
        parent_end.setblocking(False)
        with self._lock:
            self._children[slot] = _Worker(pid, slot, parent_end)

    def _await_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            with self._lock:
                pending = [w for w in self._children.values() if not w.ready]
            for w in pending:
                self._read_lifeline(w)
                if w.error or w.exited:
                    msg = w.error.decode(errors="replace") or "exited before listening"
                    raise RuntimeError(f"fastmux worker {w.pid} failed to start: {msg}")
            if all(w.ready for w in pending):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"fastmux workers not listening after {START_TIMEOUT}s")
            sel = selectors.DefaultSelector()
            try:
                for w in pending:
                    if not w.ready:
                        sel.register(w.sock, selectors.EVENT_READ)
                if self._wake_r is not None:
                    sel.register(self._wake_r, selectors.EVENT_READ)
                sel.select(0.1)
            finally:
                sel.close()
            if self._wake_r is not None:
                self._drain_wake()
                if self._stop_requested:
                    raise RuntimeError("the pool was stopped while its workers started")

    def _read_lifeline(self, w: _Worker) -> None:
        """Read what worker `w` said; mark it exited on EOF."""
        while True:
            try:
                data = w.sock.recv(4096)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:
                w.exited = True
                return
            if data[:1] == _ERROR or w.error:
                w.error += data.lstrip(_ERROR)
            elif data[:1] == _READY:
                w.ready = True

    def _supervise(self) -> None:
        """The supervisor's loop: restart workers that die, until stopped."""
        backoff: Dict[int, float] = {}
        try:
            sel = selectors.DefaultSelector()
            assert self._wake_r is not None
            sel.register(self._wake_r, selectors.EVENT_READ)
            try:
                while not self._stop_requested:
                    with self._lock:
                        live = dict(self._children)
                    for w in live.values():
                        try:
                            sel.register(w.sock, selectors.EVENT_READ, w)
                        except (KeyError, ValueError):
                            pass
                    for key, _ in sel.select(0.2):
                        if key.fileobj is self._wake_r:
                            self._drain_wake()
                        else:
                            self._read_lifeline(key.data)
                    self._flush_report()
                    if self._stop_requested:
                        break
                    for slot, w in live.items():
                        if not w.exited and not self._reap(w):
                            continue
                        # A dead worker: its connections are gone; start another.
                        try:
                            sel.unregister(w.sock)
                        except (KeyError, ValueError):
                            pass
                        if not self._reap(w):
                            continue  # closed its lifeline but still exiting
                        w.sock.close()
                        lived = time.monotonic() - w.started
                        delay = backoff.get(slot, 0.0)
                        delay = 0.0 if lived > 5.0 else min(max(0.1, delay * 2), 5.0)
                        backoff[slot] = delay
                        logger.warning(
                            "fastmux worker %d (slot %d) exited (%s) after %.1fs; "
                            "restarting it%s", -w.pid, slot, _describe(w.status), lived,
                            f" in {delay:.1f}s" if delay else "")
                        self._report_pids()
                        if delay and self._sleep(delay):
                            break
                        with self._lock:
                            del self._children[slot]
                        self._spawn(slot)
                        self._restarts += 1
                        logger.info("fastmux worker %d (slot %d) started, replacing %d",
                                    self._children[slot].pid, slot, -w.pid)
                        self._report_pids()
            finally:
                sel.close()
        except BaseException as e:
            self._error = e
        finally:
            try:
                self._shutdown_children()
            finally:
                self._close_supervisor()
                self._done.set()

    def _sleep(self, delay: float) -> bool:
        """Sleep up to `delay`; True if a stop was requested meanwhile."""
        deadline = time.monotonic() + delay
        sel = selectors.DefaultSelector()
        try:
            if self._wake_r is not None:
                sel.register(self._wake_r, selectors.EVENT_READ)
            while not self._stop_requested and time.monotonic() < deadline:
                if sel.select(max(0.0, deadline - time.monotonic())):
                    self._drain_wake()
        finally:
            sel.close()
        return self._stop_requested

    def _reap(self, w: _Worker) -> bool:
        """True if worker `w` has exited (and is reaped)."""
        if w.pid <= 0:
            return True
        try:
            pid, status = os.waitpid(w.pid, os.WNOHANG)
        except ChildProcessError:
            pid, status = w.pid, None
        if pid == 0:
            return False
        w.status = status
        w.exited = True
        w.pid = -w.pid  # reaped; never signal that pid again
        return True

    def _shutdown_children(self) -> None:
        """Close every lifeline (workers drain and exit), wait, then kill."""
        with self._lock:
            children = list(self._children.values())
        for w in children:
            try:
                w.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            w.sock.close()
        deadline = time.monotonic() + self.shutdown_timeout + 2.0
        alive = [w for w in children if not self._reap(w)]
        while alive and time.monotonic() < deadline:
            time.sleep(0.02)
            alive = [w for w in alive if not self._reap(w)]
        for w in alive:
            logger.warning("fastmux worker %d (slot %d) still running %.1fs after the stop; "
                           "killing it", w.pid, w.slot, self.shutdown_timeout + 2.0)
            try:
                os.kill(w.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for w in alive:
            try:
                _, w.status = os.waitpid(w.pid, 0)
            except ChildProcessError:
                pass
            w.exited = True
            w.pid = -abs(w.pid)
        for w in children:
            logger.info("fastmux worker %d (slot %d) stopped (%s)", abs(w.pid), w.slot,
                        _describe(w.status))
        with self._lock:
            self._children.clear()

    def _close_supervisor(self) -> None:
        for s in (self._wake_r, self._wake_w):
            if s is not None:
                s.close()
        self._wake_r = self._wake_w = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._unix_path:
            unlink_socket_path(self._unix_path, self._unix_ino)

    # -- the worker process --------------------------------------------------

    def _worker_main(self, lifeline: socket.socket) -> int:
        """Runs in a forked child: listen, serve until the supervisor lets
        go, drain, exit.  Returns the exit code."""
        # Only the forking thread exists here.  Leave the parent's resources
        # alone except the ones that would keep sockets alive or confuse us.
        self._lock = threading.Lock()  # the parent's may have been held at fork
        for w in list(self._children.values()):
            w.sock.close()
        self._children = {}
        for s in (self._wake_r, self._wake_w):
            if s is not None:
                s.close()
        # Ctrl+C reaches the whole process group: the supervisor decides.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        try:
            signal.set_wakeup_fd(-1)
        except ValueError:
            pass
        listener = self._sock
        assert listener is not None
        try:
            loop = Loop(self.backend)
        except BaseException as e:
            _tell(lifeline, _ERROR + repr(e).encode())
            return 1
        try:
            try:
                if self._unix_path is not None:
                    self._sock = None
                    loop.listen(None, self._factory, framing=self._framing, sock=listener,
                                **self._listen_options)
                else:
                    listener.close()  # the workers bind their own
                    self._sock = None
                    host, port = self._address[0], self._address[1]  # type: ignore[index]
                    loop.listen((host, port), self._factory, framing=self._framing,
                                reuse_port=True, **self._listen_options)
            except BaseException as e:
                _tell(lifeline, _ERROR + repr(e).encode())
                return 1
            loop.add_signal_handler(signal.SIGTERM, loop.stop)
            lifeline.setblocking(False)
            conn = loop.connect(None, lambda: _Lifeline(loop), sock=lifeline)
            conn.write(_READY)
            loop.run()
            loop.shutdown(self.shutdown_timeout)
            return 0
        finally:
            loop.close()


def _describe(status: Optional[int]) -> str:
    """A wait status in words: "exit code 1", "killed by signal 9 (SIGKILL)"."""
    if status is None:
        return "exit status unknown"
    code = os.waitstatus_to_exitcode(status)
    if code >= 0:
        return f"exit code {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = "?"
    return f"killed by signal {-code} ({name})"


def _tell(sock: socket.socket, data: bytes) -> None:
    try:
        sock.setblocking(True)
        sock.settimeout(2.0)
        sock.sendall(data)
    except OSError:
        pass


class _Lifeline(Handler):
    """The worker's end of the supervisor link: EOF or an error stops it."""

    def __init__(self, loop: Loop) -> None:
        self._loop = loop

    def on_eof(self, conn: Connection) -> Optional[bool]:
        self._stop()
        return None

    def on_close(self, conn: Connection, exc: Optional[BaseException]) -> None:
        self._stop()

    def _stop(self) -> None:
        # Only while run() runs: during the drain that follows, stop() would
        # make every remaining iteration poll without waiting.
        if self._loop.is_running():
            self._loop.stop()


def serve(address: Address, handler_factory: HandlerFactory, *,
          framing: Optional[Framing] = None, workers: Optional[int] = None,
          backend: str = "auto", shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT,
          ready: Optional[Any] = None, **listen_options: Any) -> None:
    """Serve until SIGINT or SIGTERM: ``WorkerPool(...).start()``, then wait.

    Main thread only (it installs the signal handlers, and restores the
    previous ones on return).  `ready`, if given, is called with the pool
    once it is listening (e.g. to print ``pool.address``)."""
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("serve() installs signal handlers: call it from the main thread")
    pool = WorkerPool(address, handler_factory, framing=framing, workers=workers,
                      backend=backend, shutdown_timeout=shutdown_timeout, **listen_options)

    def on_signal(signum: int, frame: Any) -> None:
        pool._request_stop()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        pool.start()
        if ready is not None:
            ready(pool)
        while not pool.wait(0.5):
            if pool._stop_requested:
                break
        pool.stop()
    finally:
        if pool._started and not pool._done.is_set():
            pool.stop()
        for s, h in previous.items():
            signal.signal(s, h)
    err = pool._error
    if err is not None and not isinstance(err, Exception):
        raise err
