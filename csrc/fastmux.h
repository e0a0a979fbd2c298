/*
 * fastmux.h -- the C ABI of the fastmux core.
 *
 * This is the only boundary between C and Python: fastmux/_build.py reads the
 * declarations between the FM_CDEF_BEGIN and FM_CDEF_END markers and hands them
 * to cffi's cdef() verbatim, so the two cannot drift.  Everything above and below
 * the markers is for the C compiler only.
 *
 * The core owns every fd handed to it (connections, listeners are borrowed: the
 * core never closes a listener fd).  Objects are named by small integer ids
 * (slots); a slot is reused only after Python has been handed the event that
 * ends it (see loop.c, "Lifecycle of a slot").
 *
 * Calls from Python are made with the GIL released (cffi does that for every
 * call), so nothing here touches Python objects.  A loop is used by one thread;
 * only fm_wakeup() may be called from any thread.
 */
#ifndef FASTMUX_H
#define FASTMUX_H

#include <stddef.h>
#include <stdint.h>

/* FM_CDEF_BEGIN */
/* Event kinds in a batch. */
#define FM_EV_MSG 1        /* id=conn, [start,end) = payload in the arena       */
#define FM_EV_ACCEPT 2     /* id=new conn, start=listener id, end=fd            */
#define FM_EV_CONNECTED 3  /* id=conn: a non-blocking connect completed         */
#define FM_EV_EOF 4        /* id=conn: peer half-closed, all messages delivered */
#define FM_EV_CLOSED 5     /* id=conn, start=errno (0: none), end=FM_R_* reason */
#define FM_EV_DRAIN 6      /* id=conn: queued output fell to the low watermark  */
#define FM_EV_WATCH 7      /* id=watch id, start=FM_WATCH_* bits that are ready */

/* Why a connection closed (the `end` field of FM_EV_CLOSED). */
#define FM_R_NONE 0        /* closed/aborted locally, or clean                  */
#define FM_R_ERROR 1       /* a socket error; start holds errno                 */
#define FM_R_TOOLARGE 2    /* a message exceeded its framing's max_size         */
#define FM_R_WBUFFULL 3    /* queued output exceeded max_write_buffer           */
#define FM_R_IDLE 4        /* no inbound bytes within idle_timeout              */
#define FM_R_REJECTED 5    /* listener at max_connections (never reported)      */

/* What a watch waits for (fm_watch_add) and reports (FM_EV_WATCH's start). */
#define FM_WATCH_READ 1
#define FM_WATCH_WRITE 2

/* Framing kinds. */
#define FM_FR_RAW 0
#define FM_FR_DELIM 1
#define FM_FR_LENGTH 2
#define FM_FR_FIXED 3

typedef struct fm_loop fm_loop;

/* The batch filled by fm_poll(): n events of four uint32 each, laid out
 * flat -- ev[4i] kind, ev[4i+1] id, ev[4i+2] start, ev[4i+3] end -- so Python
 * converts the whole batch with one ffi.unpack.  `ev` stays at the same
 * address for the loop's life; `arena` (message bytes) may move between
 * polls. */
typedef struct fm_batch {
    uint32_t *ev;
    char *arena;
    size_t used;
    int n;
} fm_batch;

typedef struct fm_stats {
    uint64_t accepted;
    uint64_t rejected;
    uint64_t bytes_in;
    uint64_t bytes_out;
    uint64_t reads;
    uint64_t writes;
    uint64_t polls;
    uint64_t emfile;
    uint64_t messages_in;
    int64_t connections_open;
    uint64_t messages_out;   /* fm_queue calls that queued bytes */
} fm_stats;

fm_loop *fm_loop_new(void);
void fm_loop_free(fm_loop *loop);          /* closes every connection fd */
int fm_loop_fd(fm_loop *loop);             /* the epoll fd */
fm_batch *fm_loop_batch(fm_loop *loop);
fm_stats *fm_loop_stats(fm_loop *loop);
int fm_loop_after_fork(fm_loop *loop);     /* child: new epoll fd, re-register */

/* Block in epoll_wait for at most timeout_ms (-1: forever; 0 is used while the
 * core's own ready list is non-empty), do all I/O, fill the batch.  Returns the
 * number of events, or -errno. */
int fm_poll(fm_loop *loop, int timeout_ms);
int fm_has_pending(fm_loop *loop);         /* ready list, queued events or writes */
int fm_wakeup(fm_loop *loop);              /* any thread; async-signal-safe */
int fm_set_timer(fm_loop *loop, int64_t deadline_ns); /* CLOCK_MONOTONIC; <0 off */

/* A framing spec is registered once and named by its id. */
int fm_framing_new(fm_loop *loop, int kind, uint64_t max_size, uint32_t n,
                   const char *sep, size_t seplen, int little_endian);

int fm_listener_add(fm_loop *loop, int fd, int framing, int64_t max_connections);
int fm_listener_remove(fm_loop *loop, int lid);   /* does not close the fd */
int fm_listener_set(fm_loop *loop, int lid, uint64_t max_write_buffer,
                    int64_t idle_timeout_ms);

int fm_conn_add(fm_loop *loop, int fd, int framing, int connecting);
int fm_conn_set(fm_loop *loop, int cid, uint64_t max_write_buffer,
                int64_t idle_timeout_ms);
/* Queue `len` bytes and try to send them now.  Returns the bytes still queued
 * (>= 0), or -errno if the connection can no longer send. */
int64_t fm_send(fm_loop *loop, int cid, const char *data, size_t len);
/* Queue `len` bytes for fm_flush(), which sends everything queued for a
 * connection with one send(2): the write path of the C Connection type
 * (csrc/speedups.c).  A write of FM_SEND_NOW bytes or more is sent at once,
 * together with what was queued before it (one sendmsg, no copy unless the
 * kernel leaves some).  Never emits events, so it may be called between
 * polls.  Returns the bytes held for the connection (>= 0) or -errno. */
int64_t fm_queue(fm_loop *loop, int cid, const char *data, size_t len);
/* Send what fm_queue() queued, one send per connection; end_iteration says
 * the loop iteration is over (a later fm_queue wakes a hosting loop).
 * Returns the number of connections flushed. */
int fm_flush(fm_loop *loop, int end_iteration);
/* fm_flush() for one connection; returns the bytes still held or -errno. */
int64_t fm_flush_conn(fm_loop *loop, int cid);
/* The functions above (and fm_poll) as a table of pointers, for the
 * limited-API extension that calls them without cffi (fm_api below). */
const void *fm_api_table(void);
int fm_close(fm_loop *loop, int cid);      /* flush, then close */
int fm_abort(fm_loop *loop, int cid);      /* close now, drop output */
int fm_shutdown(fm_loop *loop, int cid);   /* SHUT_WR once output is flushed */
int fm_pause(fm_loop *loop, int cid);
int fm_resume(fm_loop *loop, int cid);
int fm_set_framing(fm_loop *loop, int cid, int framing);
/* Put raw bytes back in front of the unread input and re-frame them; if
 * reemit_eof, a delivered EOF is delivered again after them. */
int fm_pushback(fm_loop *loop, int cid, const char *data, size_t len,
                int reemit_eof);
int fm_set_write_limits(fm_loop *loop, int cid, uint64_t high, uint64_t low);
int64_t fm_write_buffer_size(fm_loop *loop, int cid);

/* A foreign fd (not owned, never read or written by the core), watched
 * level-triggered: an FM_EV_WATCH per poll while it is ready for any of
 * `events` (FM_WATCH_* bits; 0 parks the watch). */
int fm_watch_add(fm_loop *loop, int fd, int events);
int fm_watch_set(fm_loop *loop, int wid, int events);
int fm_watch_remove(fm_loop *loop, int wid);

/* The framers as a pure function over bytes (for differential tests and the
 * fuzzer): finds at most maxout complete messages in buf[0,len), stores their
 * payload offsets, sets *consumed to the end of the last one.  Returns the
 * count, and sets *toolarge if an oversized message stopped it. */
int fm_split(int kind, uint64_t max_size, uint32_t n, const char *sep,
             size_t seplen, int little_endian, const char *buf, size_t len,
             uint32_t *starts, uint32_t *ends, int maxout, size_t *consumed,
             int *toolarge);

/* Limits, for tests and docs: fm_const(FM_CONST_*) is FM_<name>, the value
 * fastmux/_constants.py must hold too. */
#define FM_CONST_READ_BUDGET 0       /* bytes read from one connection per poll */
#define FM_CONST_ACCEPT_BUDGET 1     /* accepts per listener per poll           */
#define FM_CONST_BATCH_MAX 2         /* events in one batch                     */
#define FM_CONST_READ_CHUNK 3        /* bytes asked for by one recv             */
#define FM_CONST_DEFAULT_HIGH 4      /* write queue high watermark              */
#define FM_CONST_DEFAULT_LOW 5       /* write queue low watermark               */
#define FM_CONST_DISCARD_MAX 6       /* input discarded before a close          */
#define FM_CONST_EMFILE_BACKOFF_MS 7 /* accept pause when out of fds            */
#define FM_CONST_SEND_NOW 8          /* fm_queue sends writes this big at once  */
int64_t fm_const(int which);
/* FM_CDEF_END */

/* What fm_api_table() points to: the calls csrc/speedups.c makes on the hot
 * path, with the GIL held (fm_queue, fm_flush*, fm_pause) or released
 * (fm_poll). */
typedef struct fm_api {
    int abi;                 /* FM_API_ABI */
    int (*poll)(fm_loop *, int);
    int64_t (*queue)(fm_loop *, int, const char *, size_t);
    int (*flush)(fm_loop *, int);
    int64_t (*flush_conn)(fm_loop *, int);
    fm_batch *(*batch)(fm_loop *);
} fm_api;
#define FM_API_ABI 1

#endif
