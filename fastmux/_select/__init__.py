"""SelectBackend: the Backend protocol in pure Python on the stdlib ``selectors``.

Why this backend behaves like the edge-triggered C core
    ``selectors.DefaultSelector`` (epoll, kqueue, poll or select) is used
    level-triggered: it reports an fd for as long as it is ready.  The C core
    is edge-triggered: it hears about an fd once and keeps its own ready list
    for every connection it stopped serving before EAGAIN.  The two agree on
    everything a caller can observe because this backend applies the very
    same rules on top of the level-triggered selector:

    * A connection is read at most READ_BUDGET bytes per poll, in READ_CHUNK
      recv calls, stopping early on a short read, EAGAIN or EOF.  A
      connection stopped by its budget, or whose messages did not fit in the
      batch (BATCH_MAX events), goes on ``self._ready`` and the next poll
      does not block.  Messages already split but left out of a full batch
      wait on the connection, which is not read again until they are out,
      so a flood of tiny messages cannot grow its input without bound.
      The selector would re-report most of those fds
      anyway, but not bytes already sitting in our own input buffer (after
      ``resume``, ``pushback`` or ``set_framing``), so the ready list is what
      makes those cases work, exactly as in C.
    * Where the C core simply ignores an edge (a paused connection, one that
      has seen EOF, one that is closing), a level-triggered selector would
      report the fd in every poll and the loop would spin.  So read interest
      is registered only while the connection is actually being read, and
      write interest only while output is queued or a connect is pending.
    * Listeners accept until EAGAIN with ACCEPT_BUDGET per poll.  Out of
      resources (EMFILE, ENFILE, ENOBUFS, ENOMEM) the backlog is accepted and
      closed with the reserve fd, as in csrc/listen.c; without a reserve (or
      on another listener error) read interest is dropped for EMFILE_BACKOFF
      seconds, so a full fd table cannot make the loop spin.
    * Each fd is served at most once per poll, whether it was reported by the
      selector, is on the ready list, or both.

Lifecycle of an id
    A closed connection becomes a zombie: its socket is closed at once but its
    id stays taken, and every call on it is harmless.  When a poll hands out
    its EV_CLOSED the id is queued, and it returns to the free list only at
    the start of the following poll, so the loop never sees an id reused
    inside a batch it is still dispatching.  Listener and watch ids are freed
    the same way.

Events produced outside ``poll`` (an ``abort``, a failed inline ``send``, a
close that had nothing left to flush) wait in ``self._pending`` and lead the
next batch; ``has_pending`` reports them, so that poll does not block.

Layout: one module per file of the C core, with the C names where the
logic is the same, so that a change to one side has an obvious place on
the other (tests/test_conformance.py keeps the two equal):

    internal.py  csrc/internal.h   the slots (_Conn, _Listener, _Watch), the
                                   fields the files share, their prototypes
    loop.py      csrc/loop.c       SelectBackend: poll (_poll_begin,
                                   _flush_dying, _dispatch, _run_ready), the
                                   batch (_emit), wake-up, watches,
                                   after_fork, close_all
    stream.py    csrc/stream.c     a connection: _conn_process, _conn_read,
                                   _conn_recv, _frame_buffered, send, _flush,
                                   _after_flush, close, _conn_kill, _idle_sweep
    listen.py    csrc/listen.c     listeners: _listener_io, _on_accepted,
                                   _shed_backlog (fm__emfile), the back-off
    fastmux/_framing.py  csrc/framing.c  the reference framer
"""

from .loop import SelectBackend

__all__ = ["SelectBackend"]
