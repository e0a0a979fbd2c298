"""Multi-process serving: one supervisor, N worker processes, one port.

``start()`` binds the address once (so port 0 becomes a real port and
``pool.address`` can tell it), then forks ONE process, the supervisor, which
forks the workers and restarts those that die.  Each worker makes its own Loop
(a loop inherited across fork is unusable) and listens:

* TCP: every worker binds the supervisor's port again with ``SO_REUSEPORT``
  and the kernel spreads new connections over the workers.  The supervisor's
  own socket is bound but never listens, so it takes no connections; it only
  holds the port while workers come and go.
* Unix socket paths: Linux has no ``SO_REUSEPORT`` for Unix sockets, and
  workers sharing one listener spread nothing (all are woken, the first to
  call accept() takes what is queued: a burst mostly goes to one of them;
  ``EPOLLEXCLUSIVE`` wakes the first waiter in registration order, so
  connections arriving one at a time all went to one).  So the supervisor
  alone accepts, and hands the connections to the workers in turn.  Each
  worker has a hand-off socketpair; a message is one byte carrying up to
  ``_BATCH`` accepted fds (SCM_RIGHTS), and the worker adopts each as a
  server connection (``loop.connect(None, ..., sock=...)`` with the pool's
  framing and listen options; ``max_connections`` counts the connections it
  adopted).  The supervisor accepts until EAGAIN whenever the listener is
  readable, never blocks (a worker whose socket would block is skipped;
  when all would, it keeps the connections, at most ``_MAX_HELD``, and stops
  accepting until one has room), and pauses accepting for
  ``EMFILE_BACKOFF_MS`` when out of fds or memory.  It keeps a copy of each
  worker's end, so it can see what the worker has not read yet (FIONREAD)
  and take it back: a worker that reads nothing for ``_STALL`` seconds
  (stuck in a handler, say) loses what waits for it to the other workers
  and is handed nothing more until it reads again (a probe byte tells); a
  worker that dies loses only the connections it had already read and not
  yet adopted (the kernel closes those), and its replacement gets a fresh
  socketpair.  (A worker out of fds when it reads loses that message's
  connections the same way: the kernel closes the fds it cannot install.)

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

import array
import collections
import errno
import fcntl
import logging
import os
import selectors
import signal
import socket
import sys
import termios
import threading
import time
from typing import Any, Deque, Dict, List, Optional, Tuple

from ._checks import check_pool_args
from ._constants import EMFILE_BACKOFF_MS, WATCH_READ
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

#: Most connections handed to a worker in one message (Linux's own limit,
#: SCM_MAX_FD, is 253); the worker asks for this many fds per message.
_BATCH = 64

#: Most accepted connections a Unix pool's supervisor holds while no worker
#: can take them; beyond it, it stops accepting and the backlog queues.
_MAX_HELD = 256

#: Seconds a worker may leave a handed-off connection unread before the
#: supervisor takes it back and hands it to another worker.
_STALL = 0.5

#: Seconds before a hand-off that failed for want of kernel resources
#: (ETOOMANYREFS, ENOBUFS; no writability event will say when) is retried.
_RETRY = 0.05

#: Hand-off messages a worker reads per wake-up (the watch is level-triggered:
#: what is left wakes it again after the other connections had their turn).
_ADOPT_BUDGET = 64

#: accept() errors that concern only the connection being accepted.
_ACCEPT_SKIP = frozenset((errno.ECONNABORTED, errno.EPROTO))

_MSG_NOSIGNAL: int = getattr(socket, "MSG_NOSIGNAL", 0)
_MSG_CMSG_CLOEXEC: int = getattr(socket, "MSG_CMSG_CLOEXEC", 0)

#: What ``listen_options`` may hold (the rest of Loop.listen's keywords).
_LISTEN_OPTIONS = ("backlog", "max_connections", "idle_timeout", "max_write_buffer")

logger = logging.getLogger("fastmux")


def _default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


class _Channel:
    """A Unix pool's hand-off socketpair to one worker, held by the
    supervisor: `send` is its end; `peer` is its copy of the worker's end,
    to count what the worker has not read (FIONREAD: one byte a message)
    and to take that back from a worker that is stuck or dead."""

    __slots__ = ("send", "peer", "sent", "taken", "consumed", "since", "stalled", "full")

    def __init__(self) -> None:
        self.send, self.peer = socket.socketpair()
        self.send.setblocking(False)
        self.peer.setblocking(False)
        self.sent = 0  # messages sent
        self.taken = 0  # messages taken back
        self.consumed = 0  # messages the worker had read when last checked
        # When the worker last showed progress while something waited for
        # it; None while nothing does.
        self.since: Optional[float] = None
        self.stalled = False  # stuck: hand it nothing until it reads again
        self.full = False  # the last send would have blocked

    def queued(self) -> int:
        """Messages waiting for the worker."""
        n = array.array("i", [0])
        fcntl.ioctl(self.peer.fileno(), termios.FIONREAD, n, True)
        return n[0]

    def close(self) -> None:
        self.send.close()
        self.peer.close()


class _Worker:
    """The supervisor's record of one worker process."""

    __slots__ = ("pid", "slot", "sock", "chan", "ready", "error", "started", "exited",
                 "status")

    def __init__(self, pid: int, slot: int, sock: socket.socket,
                 chan: Optional[_Channel]) -> None:
        self.pid = pid
        self.slot = slot
        self.sock = sock  # the supervisor's end of the lifeline
        self.chan = chan  # the hand-off socketpair (Unix paths)
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
        self._dispatch: Optional[_Dispatcher] = None  # Unix paths: accepts, hands off

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
        chan: Optional[_Channel] = None
        try:
            if self._unix_path is not None:
                chan = _Channel()
            pid = os.fork()
        except BaseException:
            parent_end.close()
            child_end.close()
            if chan is not None:
                chan.close()
            raise
        if pid == 0:  # the worker; never returns
            code = 1
            try:
                parent_end.close()
                code = self._worker_main(child_end, chan)
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
            self._children[slot] = _Worker(pid, slot, parent_end, chan)

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
        """The supervisor's loop: restart workers that die and, for a Unix
        path, accept connections and hand them to the workers, until
        stopped.  It never sleeps in anything but its select: a restart
        that backs off is a deadline, not a sleep."""
        backoff: Dict[int, float] = {}
        respawn: Dict[int, Tuple[float, int]] = {}  # slot -> (when, the pid it replaces)
        try:
            sel = selectors.DefaultSelector()
            assert self._wake_r is not None
            sel.register(self._wake_r, selectors.EVENT_READ)
            disp = None
            if self._unix_path is not None:
                assert self._sock is not None
                disp = self._dispatch = _Dispatcher(self._sock, self.workers)
            try:
                while not self._stop_requested:
                    with self._lock:
                        live = dict(self._children)
                    for w in live.values():
                        try:
                            sel.register(w.sock, selectors.EVENT_READ, w)
                        except (KeyError, ValueError):
                            pass
                    now = time.monotonic()
                    timeout = 0.2
                    if disp is not None:
                        timeout = disp.interest(sel, live, now, timeout)
                    for when, _ in respawn.values():
                        timeout = min(timeout, max(0.0, when - now))
                    for key, _ in sel.select(timeout):
                        if key.fileobj is self._wake_r:
                            self._drain_wake()
                        elif key.data is None:  # the listener
                            assert disp is not None
                            disp.readable = True
                        elif key.fileobj is key.data.sock:
                            self._read_lifeline(key.data)
                        else:  # a full hand-off socket has room again
                            key.data.chan.full = False
                    self._flush_report()
                    if self._stop_requested:
                        break
                    if disp is not None:
                        disp.run(live, time.monotonic())
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
                        if w.chan is not None:
                            assert disp is not None
                            disp.forget(sel, w.chan)  # what it had not read goes elsewhere
                        lived = time.monotonic() - w.started
                        delay = backoff.get(slot, 0.0)
                        delay = 0.0 if lived > 5.0 else min(max(0.1, delay * 2), 5.0)
                        backoff[slot] = delay
                        logger.warning(
                            "fastmux worker %d (slot %d) exited (%s) after %.1fs; "
                            "restarting it%s", -w.pid, slot, _describe(w.status), lived,
                            f" in {delay:.1f}s" if delay else "")
                        with self._lock:
                            del self._children[slot]
                        respawn[slot] = (time.monotonic() + delay, -w.pid)
                        self._report_pids()
                    for slot, (when, old) in sorted(respawn.items()):
                        if when > time.monotonic() or self._stop_requested:
                            continue
                        del respawn[slot]
                        self._spawn(slot)
                        self._restarts += 1
                        logger.info("fastmux worker %d (slot %d) started, replacing %d",
                                    self._children[slot].pid, slot, old)
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
        if self._dispatch is not None:
            # Stop accepting first: a client now is refused, not left waiting.
            self._dispatch.close()
            self._dispatch = None
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
            if w.chan is not None:
                w.chan.close()  # the kernel closes what the worker did not read
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

    def _worker_main(self, lifeline: socket.socket, chan: Optional[_Channel]) -> int:
        """Runs in a forked child: listen (or, for a Unix path, adopt what
        the supervisor hands over `chan`), serve until the supervisor lets
        go, drain, exit.  Returns the exit code."""
        # Only the forking thread exists here.  Leave the parent's resources
        # alone except the ones that would keep sockets alive or confuse us.
        self._lock = threading.Lock()  # the parent's may have been held at fork
        for w in list(self._children.values()):
            w.sock.close()
            if w.chan is not None:
                w.chan.close()
        self._children = {}
        if self._dispatch is not None:
            self._dispatch.close_held()  # the listener is self._sock, below
            self._dispatch = None
        handoff = None
        if chan is not None:
            chan.send.close()
            handoff = chan.peer
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
        adopter = None
        try:
            try:
                if handoff is not None:
                    listener.close()  # the supervisor accepts
                    self._sock = None
                    adopter = _Adopter(loop, handoff, self._factory, self._framing,
                                       self._listen_options)
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
            if adopter is not None:
                adopter.close()  # adopt nothing more while draining
            loop.shutdown(self.shutdown_timeout)
            return 0
        finally:
            if adopter is not None:
                adopter.close()
            loop.close()


def _want(sel: selectors.BaseSelector, sock: socket.socket, events: int, data: Any) -> None:
    """Make `sel` wait for `events` on `sock` (0: not at all)."""
    try:
        key = sel.get_key(sock)
    except KeyError:
        if events:
            sel.register(sock, events, data)
        return
    if not events:
        sel.unregister(sock)
    elif key.events != events:
        sel.modify(sock, events, data)


class _Dispatcher:
    """The supervisor's side of a Unix pool: accept on the listener and
    hand each connection to the next worker in turn (see the module
    docstring).  Driven by ``WorkerPool._supervise``: ``interest`` before
    its select, ``run`` after it."""

    def __init__(self, listener: socket.socket, slots: int) -> None:
        listener.setblocking(False)
        self.listener = listener
        self.slots = slots
        self.held: Deque[socket.socket] = collections.deque()  # accepted, not handed off
        self.next_slot = 0  # where the turn is
        self.readable = False  # the select saw the listener readable
        self.resume_at = 0.0  # accepting is paused until then (out of fds/memory)
        self.retry_at = 0.0  # hand-offs are paused until then (kernel resources)

    def interest(self, sel: selectors.BaseSelector, workers: Dict[int, _Worker],
                 now: float, timeout: float) -> float:
        """Register what to wait for; returns `timeout`, shortened to the
        next deadline (a paused accept, a retry, a stall check)."""
        accepting = len(self.held) < _MAX_HELD and now >= self.resume_at
        _want(sel, self.listener, selectors.EVENT_READ if accepting else 0, None)
        if now < self.resume_at:
            timeout = min(timeout, self.resume_at - now)
        if self.held and now < self.retry_at:
            timeout = min(timeout, self.retry_at - now)
        elif self.held and any(self._takes(w) for w in workers.values()):
            timeout = 0.0  # e.g. taken back from a worker that died: hand on now
        for w in workers.values():
            ch = w.chan
            if ch is None:
                continue
            if not self.held or w.exited:
                ch.full = False  # found out again by the next send
            _want(sel, ch.send, selectors.EVENT_WRITE if ch.full else 0, w)
            if ch.since is not None and not w.exited:
                timeout = min(timeout, ch.since + _STALL - now)
        return max(0.0, timeout)

    def run(self, workers: Dict[int, _Worker], now: float) -> None:
        self.check(workers, now)
        self.hand_off(workers, now)
        if self.readable:
            self.readable = False
            self.accept(workers, now)

    def accept(self, workers: Dict[int, _Worker], now: float) -> None:
        """Accept until EAGAIN (or until `_MAX_HELD` wait), handing off as
        connections pile up."""
        while len(self.held) < _MAX_HELD:
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                if e.errno in _ACCEPT_SKIP:
                    continue
                # Out of fds or memory (EMFILE, ENFILE, ENOBUFS, ENOMEM): the
                # listener stays readable, so pause rather than spin.
                self.resume_at = time.monotonic() + EMFILE_BACKOFF_MS / 1000.0
                break
            self.held.append(sock)
            if len(self.held) >= _BATCH:
                self.hand_off(workers, now)
        self.hand_off(workers, now)

    def hand_off(self, workers: Dict[int, _Worker], now: float) -> None:
        """Share what is held among the workers that can take it, in turn
        from where the turn is, one message per worker per round."""
        while self.held and now >= self.retry_at:
            order = sorted(workers, key=lambda slot: (slot - self.next_slot) % self.slots)
            ring = [workers[slot] for slot in order if self._takes(workers[slot])]
            if not ring:
                return  # kept; retried when a socket has room or a worker reads again
            share = min(_BATCH, -(-len(self.held) // len(ring)))
            moved = False
            for w in ring:
                if not self.held:
                    break
                assert w.chan is not None
                batch = [self.held.popleft() for _ in range(min(share, len(self.held)))]
                if self._send(w.chan, b"c", batch):
                    for sock in batch:
                        sock.close()  # the worker has its own copy now
                    moved = True
                    self.next_slot = (w.slot + 1) % self.slots
                else:
                    self.held.extendleft(reversed(batch))
            if not moved:
                return

    @staticmethod
    def _takes(w: _Worker) -> bool:
        ch = w.chan
        return (ch is not None and w.ready and not w.exited and w.pid > 0
                and not ch.full and not ch.stalled)

    def _send(self, ch: _Channel, tag: bytes, batch: List[socket.socket]) -> bool:
        if ch.since is not None:
            # If it has read everything, the stall clock starts again with
            # this message, not with an older one.
            self._observe(ch, time.monotonic())
        try:
            if batch:
                socket.send_fds(ch.send, [tag], [s.fileno() for s in batch], _MSG_NOSIGNAL)
            else:
                ch.send.send(tag, _MSG_NOSIGNAL)
        except (BlockingIOError, InterruptedError):
            ch.full = True  # its queue is full: EVENT_WRITE says when it is not
            return False
        except OSError:
            # ETOOMANYREFS (too many fds in flight), ENOBUFS, ENOMEM: nothing
            # will signal the end of it, so try again a little later.
            self.retry_at = time.monotonic() + _RETRY
            return False
        ch.sent += 1
        if ch.since is None:
            ch.since = time.monotonic()
        return True

    @staticmethod
    def _observe(ch: _Channel, now: float) -> int:
        """Look at `ch`'s queue: a worker that has read anything since the
        last look is not stuck.  Returns how many messages wait."""
        queued = ch.queued()
        consumed = ch.sent - ch.taken - queued
        if consumed != ch.consumed:
            ch.consumed = consumed
            ch.stalled = False
            ch.since = now if queued else None
        return queued

    def check(self, workers: Dict[int, _Worker], now: float) -> None:
        """Take back what a stuck worker has left unread for `_STALL`."""
        for w in workers.values():
            ch = w.chan
            if ch is None or ch.since is None or now < ch.since + _STALL or w.exited:
                continue
            before = ch.consumed
            queued = self._observe(ch, now)
            if ch.consumed != before:
                continue  # it reads: not stuck
            if ch.stalled:  # still stuck; its probe waits (or is sent now)
                if not queued:
                    self._send(ch, b"p", [])
                ch.since = now
            elif not queued:
                ch.since = None
            else:
                n = self.reclaim(ch)
                ch.stalled = True
                logger.warning("fastmux worker %d (slot %d) read nothing for %.1fs; "
                               "%d connection(s) waiting for it go to other workers",
                               w.pid, w.slot, _STALL, n)
                self._send(ch, b"p", [])  # when it reads this, it is back
                ch.consumed = ch.sent - ch.taken - ch.queued()
                ch.since = now

    def reclaim(self, ch: _Channel) -> int:
        """Take back every message waiting in `ch`; their connections go to
        the front of the queue.  Returns how many connections."""
        got: List[socket.socket] = []
        while True:
            try:
                data, fds, _, _ = socket.recv_fds(ch.peer, 1, _BATCH, _MSG_CMSG_CLOEXEC)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                break
            if not data and not fds:
                break
            ch.taken += 1
            got.extend(socket.socket(fileno=fd) for fd in fds)
        self.held.extendleft(reversed(got))
        return len(got)

    def forget(self, sel: selectors.BaseSelector, ch: _Channel) -> None:
        """A worker is gone (reaped): take back what it had not read, close
        its channel."""
        _want(sel, ch.send, 0, None)
        self.reclaim(ch)
        ch.close()

    def close_held(self) -> None:
        while self.held:
            self.held.popleft().close()

    def close(self) -> None:
        """Stop accepting; close what was not handed off (the peers see EOF)."""
        self.listener.close()
        self.close_held()


class _Adopter:
    """A worker's end of its hand-off socket (Unix paths): each connection
    the supervisor passes becomes a server connection of this loop, with
    the pool's framing and listen options, as if its own listener had
    accepted it."""

    def __init__(self, loop: Loop, sock: socket.socket, factory: HandlerFactory,
                 framing: Optional[Framing], options: Dict[str, Any]) -> None:
        unknown = sorted(set(options) - set(_LISTEN_OPTIONS))
        if unknown:
            raise TypeError(f"unexpected listen option(s): {', '.join(unknown)}")
        maxc = options.get("max_connections")
        self._max = None if maxc is None else int(maxc)
        self._options = {k: options[k] for k in ("idle_timeout", "max_write_buffer")
                         if k in options}
        self._loop = loop
        self._sock = sock
        self._factory = factory
        self._framing = framing
        self._conns: List[Connection] = []  # adopted; kept only for max_connections
        sock.setblocking(False)
        self._wid = loop._watch_add(sock.fileno(), WATCH_READ, self._readable)

    def _readable(self, ready: int) -> None:
        for _ in range(_ADOPT_BUDGET):
            try:
                data, fds, _, _ = socket.recv_fds(self._sock, 1, _BATCH, _MSG_CMSG_CLOEXEC)
            except (BlockingIOError, InterruptedError):
                return  # read by the supervisor (taken back) or nothing left
            except OSError:
                self.close()
                return
            if not data and not fds:  # the supervisor is gone; the lifeline says so too
                self.close()
                return
            for fd in fds:  # none in a probe
                self._adopt(socket.socket(fileno=fd))

    def _adopt(self, sock: socket.socket) -> None:
        if self._max is not None and self._at_limit():
            sock.close()  # as a listener at max_connections: accepted, closed
            return
        try:
            conn = self._loop.connect(None, self._factory, sock=sock, framing=self._framing,
                                      **self._options)
        except Exception as exc:
            sock.close()  # (a no-op if connect() got as far as taking it)
            self._loop.call_exception_handler({
                "message": "exception in handler_factory", "exception": exc})
            return
        if self._max is not None:
            self._conns.append(conn)

    def _at_limit(self) -> bool:
        assert self._max is not None
        if len(self._conns) >= self._max:
            self._conns = [c for c in self._conns if not c.closed]
        return len(self._conns) >= self._max

    def close(self) -> None:
        """Adopt nothing more; what is still queued is the supervisor's."""
        if self._wid >= 0:
            self._loop._watch_remove(self._wid)
            self._wid = -1
        self._sock.close()


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
