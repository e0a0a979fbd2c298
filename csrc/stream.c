/*
 * stream.c -- one connection: the read drain, framing, the write queue.
 *
 * Reading.  A connection with no buffered input reads into the loop's one
 * scratch buffer and frames straight out of it; only an incomplete tail is
 * copied into the connection's own buffer, which is freed again once empty.
 * So an idle connection costs no input memory, and the unframed bytes of a
 * connection are bounded by its framing's max_size plus one read.
 *
 * Writing.  fm_send() is called by Python once per connection per iteration
 * with everything written in it.  With an empty queue it is sent at once
 * (one send(2), MSG_NOSIGNAL so a closed peer gives EPIPE rather than
 * SIGPIPE); the unsent tail is queued and flushed on EPOLLOUT, which edge
 * triggering reports once the socket has room again.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include "internal.h"

/* ---- buffers ---------------------------------------------------------- */

int fm__buf_reserve(fm_buf *b, size_t extra)
{
    size_t need;
    if (b->off > 0 && (b->len == 0 || b->off >= b->cap / 2)) {
        memmove(b->p, b->p + b->off, b->len);
        b->off = 0;
    }
    need = b->off + b->len + extra;
    if (need > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        char *p;
        while (cap < need)
            cap *= 2;
        p = realloc(b->p, cap);
        if (p == NULL)
            return -ENOMEM;
        b->p = p;
        b->cap = cap;
    }
    return 0;
}

void fm__buf_free(fm_buf *b)
{
    free(b->p);
    memset(b, 0, sizeof *b);
}

static void fm__buf_consume(fm_buf *b, size_t n)
{
    b->off += n;
    b->len -= n;
    if (b->len == 0) {
        /* Give back big buffers; keep small ones for the next partial. */
        if (b->cap > 64 * 1024)
            fm__buf_free(b);
        else
            b->off = 0;
    }
}

/* ---- idle timeouts -------------------------------------------------------
 * One LRU list per distinct timeout value: activity moves a connection to
 * the tail in O(1), so the head is always the next to expire, and a sweep
 * looks only at heads. */

static void fm__idle_unlink(fm_conn *c)
{
    fm_idle_list *l = c->idle;
    if (!(c->flags & FM_C_IDLE_LINKED))
        return;
    if (c->idle_prev)
        c->idle_prev->idle_next = c->idle_next;
    else
        l->head = c->idle_next;
    if (c->idle_next)
        c->idle_next->idle_prev = c->idle_prev;
    else
        l->tail = c->idle_prev;
    c->idle_prev = c->idle_next = NULL;
    c->flags &= ~FM_C_IDLE_LINKED;
}

static void fm__idle_append(fm_conn *c)
{
    fm_idle_list *l = c->idle;
    c->idle_next = NULL;
    c->idle_prev = l->tail;
    if (l->tail)
        l->tail->idle_next = c;
    else
        l->head = c;
    l->tail = c;
    c->flags |= FM_C_IDLE_LINKED;
}

void fm__idle_touch(fm_loop *loop, fm_conn *c)
{
    (void)loop;
    if (!(c->flags & FM_C_IDLE_LINKED))
        return;
    c->last_in_ms = fm__now_ms();
    if (c->idle->tail != c) {
        fm__idle_unlink(c);
        fm__idle_append(c);
    }
}

void fm__idle_set(fm_loop *loop, fm_conn *c, int64_t timeout_ms)
{
    int i, slot = -1;
    fm__idle_unlink(c);
    c->idle = NULL;
    if (timeout_ms <= 0)
        return;
    for (i = 0; i < FM_MAX_IDLE_LISTS; i++) {
        if (loop->idle[i].timeout_ms == timeout_ms) {
            slot = i;
            break;
        }
        if (slot < 0 && loop->idle[i].head == NULL)
            slot = i;
    }
    if (slot < 0)
        slot = FM_MAX_IDLE_LISTS - 1; /* too many distinct values: share */
    if (loop->idle[slot].head == NULL)
        loop->idle[slot].timeout_ms = timeout_ms;
    c->idle = &loop->idle[slot];
    c->last_in_ms = fm__now_ms();
    fm__idle_append(c);
}

/* Close connections idle past their timeout; return the next deadline in ms
 * (monotonic), or -1 if there is none. */
int64_t fm__idle_sweep(fm_loop *loop, int64_t now)
{
    int64_t next = -1;
    int i;
    for (i = 0; i < FM_MAX_IDLE_LISTS; i++) {
        fm_idle_list *l = &loop->idle[i];
        fm_conn *c;
        while ((c = l->head) != NULL) {
            int64_t due = c->last_in_ms + l->timeout_ms;
            if (due > now) {
                if (next < 0 || due < next)
                    next = due;
                break;
            }
            fm__conn_kill(loop, c, 0, FM_R_IDLE);
        }
    }
    return next;
}

/* ---- lifecycle -------------------------------------------------------- */

static int fm__slot_new(fm_loop *loop)
{
    if (loop->nfree > 0)
        return loop->free_slots[--loop->nfree];
    if (loop->conns_hwm == loop->nconns_cap) {
        int cap = loop->nconns_cap ? loop->nconns_cap * 2 : 64;
        fm_conn **cs = realloc(loop->conns, (size_t)cap * sizeof *cs);
        if (cs == NULL)
            return -1;
        loop->conns = cs;
        uint32_t *gens = realloc(loop->conn_gens, (size_t)cap * sizeof *gens);
        if (gens == NULL)
            return -1;
        loop->conn_gens = gens;
        int *fs = realloc(loop->free_slots, (size_t)cap * sizeof *fs);
        if (fs == NULL)
            return -1;
        loop->free_slots = fs;
        memset(cs + loop->nconns_cap, 0, (size_t)(cap - loop->nconns_cap) * sizeof *cs);
        memset(gens + loop->nconns_cap, 0, (size_t)(cap - loop->nconns_cap) * sizeof *gens);
        loop->nconns_cap = cap;
    }
    return loop->conns_hwm++;
}

fm_conn *fm__conn_new(fm_loop *loop, int fd, int framing, int connecting)
{
    struct epoll_event ev;
    fm_conn *c;
    int slot, one = 1;

    if (framing < 0 || framing >= loop->nframings) {
        errno = EINVAL;
        return NULL;
    }
    c = calloc(1, sizeof *c);
    if (c == NULL)
        return NULL;
    slot = fm__slot_new(loop);
    if (slot < 0) {
        free(c);
        errno = ENOMEM;
        return NULL;
    }
    c->fd = fd;
    c->slot = slot;
    c->gen = ++loop->conn_gens[slot];
    c->framing = framing;
    c->lid = -1;
    c->high = FM_DEFAULT_HIGH;
    c->low = FM_DEFAULT_LOW;
    if (connecting)
        c->flags |= FM_C_CONNECTING;
    /* Harmless on Unix sockets (ENOTSUP/EOPNOTSUPP is ignored). */
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    memset(&ev, 0, sizeof ev);
    ev.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET;
    ev.data.u64 = fm__tag(FM_T_CONN, c->gen, slot);
    if (epoll_ctl(loop->epfd, EPOLL_CTL_ADD, fd, &ev) < 0) {
        int saved = errno;
        loop->free_slots[loop->nfree++] = slot;
        free(c);
        errno = saved;
        return NULL;
    }
    loop->conns[slot] = c;
    loop->stats.connections_open++;
    return c;
}

/* The connection is over: close the fd now, emit CLOSED at the end of this
 * (or the next) poll, free the slot after that.  Idempotent. */
void fm__conn_kill(fm_loop *loop, fm_conn *c, int err, int reason)
{
    if (c->flags & FM_C_DEAD)
        return;
    c->flags |= FM_C_DEAD;
    c->close_errno = err;
    c->close_reason = reason;
    fm__idle_unlink(c);
    if (c->fd >= 0) {
        /* DEL first: a dup of this fd elsewhere would keep it registered. */
        epoll_ctl(loop->epfd, EPOLL_CTL_DEL, c->fd, NULL);
        close(c->fd);
        c->fd = -1;
    }
    fm__buf_free(&c->in);
    fm__buf_free(&c->out);
    if (c->lid >= 0 && c->lid < loop->nlisteners)
        loop->listeners[c->lid].nconns--;
    loop->stats.connections_open--;
    /* A connection on the ready list is skipped there (FM_C_DEAD); the
     * ready_next link is reused for the dying list only once it is off. */
    if (c->flags & FM_C_READY) {
        fm_conn **pp = &loop->ready_head, *prev = NULL;
        while (*pp && *pp != c) {
            prev = *pp;
            pp = &(*pp)->ready_next;
        }
        if (*pp == c) {
            *pp = c->ready_next;
            if (loop->ready_tail == c)
                loop->ready_tail = prev;
        }
        c->flags &= ~FM_C_READY;
    }
    c->ready_next = loop->dying;
    loop->dying = c;
    fm__owe_poll(loop);
}

void fm__conn_free(fm_loop *loop, fm_conn *c)
{
    if (c->fd >= 0)
        close(c->fd);
    fm__buf_free(&c->in);
    fm__buf_free(&c->out);
    if (loop->conns[c->slot] == c) {
        loop->conns[c->slot] = NULL;
        loop->free_slots[loop->nfree++] = c->slot;
    }
    free(c);
}

/* ---- reading ---------------------------------------------------------- */

/* Read and drop what the peer sent, so close() does not answer it with RST
 * (which could destroy output the peer has not read yet). */
static void fm__discard_input(fm_loop *loop, fm_conn *c)
{
    size_t total = 0;
    while (total < FM_DISCARD_MAX) {
        ssize_t n = recv(c->fd, loop->scratch, FM_READ_CHUNK, 0);
        if (n <= 0) {
            if (n < 0 && errno == EINTR)
                continue;
            break;
        }
        total += (size_t)n;
    }
}

/* Frame c->in.  Returns 0 to go on, 1 if the connection stopped (batch
 * full: it is put back on the ready list; or it died). */
static int fm__frame_buffered(fm_loop *loop, fm_conn *c)
{
    size_t consumed = 0;
    int rc;
    if (c->in.len == 0)
        return 0;
    rc = fm__frame(loop, c, c->in.p + c->in.off, c->in.len, &c->scan, &consumed);
    fm__buf_consume(&c->in, consumed);
    if (rc == FM_FRAME_TOOLARGE) {
        fm__conn_kill(loop, c, 0, FM_R_TOOLARGE);
        return 1;
    }
    if (rc == FM_FRAME_STOP) {
        c->flags |= FM_C_REFRAME;
        fm__ready_push(loop, c);
        return 1;
    }
    return 0;
}

static void fm__maybe_eof(fm_loop *loop, fm_conn *c)
{
    if ((c->flags & (FM_C_RDEOF | FM_C_EOF_SENT | FM_C_PAUSED | FM_C_DEAD |
                     FM_C_CLOSING | FM_C_REFRAME)) != FM_C_RDEOF)
        return;
    /* An incomplete trailing message at EOF is discarded. */
    fm__buf_free(&c->in);
    c->scan = 0;
    c->flags |= FM_C_EOF_SENT;
    fm__emit(loop, FM_EV_EOF, c->slot, 0, 0);
}

/* Where fm__read_dst() put a read. */
enum { FM_INTO_ARENA, FM_INTO_SCRATCH, FM_INTO_BUF };

/* Where the next recv goes: with a partial message buffered, at the end of
 * c->in; with nothing buffered, into the loop's scratch buffer (framed
 * there, only the tail is kept) or, for Raw, straight into the batch arena
 * (the read is the message).  NULL if the connection stops: the arena is
 * full (it is back on the ready list) or memory is out (it was killed). */
static char *fm__read_dst(fm_loop *loop, fm_conn *c, int *into)
{
    char *dst;
    if (c->in.len > 0) {
        if (fm__buf_reserve(&c->in, FM_READ_CHUNK) < 0) {
            fm__conn_kill(loop, c, ENOMEM, FM_R_ERROR);
            return NULL;
        }
        *into = FM_INTO_BUF;
        return c->in.p + c->in.off + c->in.len;
    }
    if (loop->framings[c->framing].kind == FM_FR_RAW) {
        dst = fm__arena_reserve(loop, FM_READ_CHUNK);
        if (dst == NULL)
            fm__ready_push(loop, c);
        *into = FM_INTO_ARENA;
        return dst;
    }
    *into = FM_INTO_SCRATCH;
    return loop->scratch;
}

/* recv(2) one chunk into dst and count it against *budget.  Returns the
 * bytes read; 0 when there is nothing more for now (EAGAIN, or the peer's
 * FIN: FM_C_RDEOF is set); -1 when the connection died. */
static ssize_t fm__conn_recv(fm_loop *loop, fm_conn *c, char *dst, size_t *budget)
{
    ssize_t n;
    do
        n = recv(c->fd, dst, FM_READ_CHUNK, 0);
    while (n < 0 && errno == EINTR);
    if (n < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK)
            return 0;
        fm__conn_kill(loop, c, errno, FM_R_ERROR);
        return -1;
    }
    loop->stats.reads++;
    if (n == 0) {
        c->flags |= FM_C_RDEOF;
        return 0;
    }
    loop->stats.bytes_in += (uint64_t)n;
    *budget = (size_t)n >= *budget ? 0 : *budget - (size_t)n;
    if (c->flags & FM_C_IDLE_LINKED)
        fm__idle_touch(loop, c);
    return n;
}

/* Raw, received straight into the arena: the read is one message. */
static void fm__emit_raw(fm_loop *loop, fm_conn *c, size_t n)
{
    size_t at = loop->batch.used;
    loop->batch.used += n;
    loop->stats.messages_in++;
    fm__emit(loop, FM_EV_MSG, c->slot, (uint32_t)at, (uint32_t)(at + n));
}

/* Frame a read that landed in the scratch buffer (nothing was buffered):
 * the messages go to the arena, only the incomplete tail is copied into
 * c->in.  Returns 0 to read on, 1 if the connection stopped (batch full:
 * it is back on the ready list; or it died). */
static int fm__frame_scratch(fm_loop *loop, fm_conn *c, const char *buf, size_t n)
{
    size_t consumed = 0, rest;
    int rc;
    c->scan = 0;
    rc = fm__frame(loop, c, buf, n, &c->scan, &consumed);
    if (rc == FM_FRAME_TOOLARGE) {
        fm__conn_kill(loop, c, 0, FM_R_TOOLARGE);
        return 1;
    }
    rest = n - consumed;
    if (rest > 0) {
        if (fm__buf_reserve(&c->in, rest) < 0) {
            fm__conn_kill(loop, c, ENOMEM, FM_R_ERROR);
            return 1;
        }
        memcpy(c->in.p + c->in.off, buf + consumed, rest);
        c->in.len = rest;
    }
    if (rc == FM_FRAME_STOP) {
        c->flags |= FM_C_REFRAME;
        fm__ready_push(loop, c);
        return 1;
    }
    return 0;
}

/* Frame n bytes just received where fm__read_dst() put them.  Returns 0 to
 * read on, 1 if the connection stopped (as fm__frame_buffered). */
static int fm__frame_read(fm_loop *loop, fm_conn *c, int into, const char *dst, size_t n)
{
    switch (into) {
    case FM_INTO_ARENA:
        fm__emit_raw(loop, c, n);
        return 0;
    case FM_INTO_SCRATCH:
        return fm__frame_scratch(loop, c, dst, n);
    default:
        c->in.len += n;
        return fm__frame_buffered(loop, c);
    }
}

/* Drain the socket into messages, within the read budget: buffered input
 * the last poll could not frame first, then read, frame, repeat until
 * EAGAIN, a short read, EOF, the budget or a full batch; then EOF. */
static void fm__conn_read(fm_loop *loop, fm_conn *c)
{
    size_t budget = FM_READ_BUDGET;

    /* Paused or closing: nothing is framed; REFRAME stays set for resume. */
    if (c->flags & (FM_C_PAUSED | FM_C_DEAD | FM_C_CLOSING))
        return;
    if (c->flags & FM_C_REFRAME) {
        c->flags &= ~FM_C_REFRAME;
        if (fm__frame_buffered(loop, c))
            return;
    }
    while (!(c->flags & (FM_C_PAUSED | FM_C_RDEOF | FM_C_DEAD | FM_C_CLOSING |
                         FM_C_CONNECTING))) {
        char *dst;
        ssize_t n;
        int into;

        if (budget == 0 || fm__batch_full(loop)) {
            fm__ready_push(loop, c);
            return;
        }
        dst = fm__read_dst(loop, c, &into);
        if (dst == NULL)
            return;
        n = fm__conn_recv(loop, c, dst, &budget);
        if (n < 0)
            return;
        if (n == 0)
            break;
        if (fm__frame_read(loop, c, into, dst, (size_t)n))
            return;
        /* A short read empties a stream socket's queue -- unless the FIN is
         * queued behind the data (RDHUP), then read on to see the 0. */
        if ((size_t)n < FM_READ_CHUNK && !(c->flags & FM_C_RDHUP))
            break;
    }
    fm__maybe_eof(loop, c);
}

/* ---- writing ---------------------------------------------------------- */

static void fm__finish_close(fm_loop *loop, fm_conn *c)
{
    fm__discard_input(loop, c);
    fm__conn_kill(loop, c, 0, FM_R_NONE);
}

/* Queue drained (or shrunk): DRAIN, deferred shutdown, deferred close. */
static void fm__after_flush(fm_loop *loop, fm_conn *c)
{
    if ((c->flags & FM_C_WANT_DRAIN) && c->out.len <= c->low) {
        c->flags &= ~FM_C_WANT_DRAIN;
        if (!(c->flags & FM_C_CLOSING))
            fm__emit(loop, FM_EV_DRAIN, c->slot, 0, 0);
    }
    if (c->out.len > 0)
        return;
    if (c->flags & FM_C_CLOSING) {
        fm__finish_close(loop, c);
        return;
    }
    if ((c->flags & (FM_C_SHUT_WANTED | FM_C_SHUT_DONE)) == FM_C_SHUT_WANTED) {
        shutdown(c->fd, SHUT_WR);
        c->flags |= FM_C_SHUT_DONE;
    }
}

/* send(2) buf until it is all sent, EAGAIN or a short write; *sent says how
 * much went.  Returns 0, or -errno after killing the connection. */
static int fm__send_some(fm_loop *loop, fm_conn *c, const char *buf, size_t len,
                         size_t *sent)
{
    size_t done = 0;
    while (done < len) {
        size_t want = len - done < FM_IO_MAX ? len - done : FM_IO_MAX;
        ssize_t n = send(c->fd, buf + done, want, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                break;
            int err = errno;
            *sent = done;
            fm__conn_kill(loop, c, err, FM_R_ERROR);
            return -err;
        }
        loop->stats.writes++;
        loop->stats.bytes_out += (uint64_t)n;
        done += (size_t)n;
        if ((size_t)n < want)
            break; /* short write: the send buffer is full */
    }
    *sent = done;
    return 0;
}

/* Send queued output until EAGAIN.  Returns 0, or -errno if it died. */
static int fm__flush(fm_loop *loop, fm_conn *c)
{
    size_t sent;
    int rc = fm__send_some(loop, c, c->out.p + c->out.off, c->out.len, &sent);
    if (rc < 0)
        return rc;
    fm__buf_consume(&c->out, sent);
    fm__after_flush(loop, c);
    return 0;
}

/* After output was queued outside a poll: past max_write_buffer the
 * connection dies; at or below the low watermark a DRAIN it is owed goes
 * through the ready list.  Returns the bytes held, or -ENOBUFS. */
static int64_t fm__queued_checks(fm_loop *loop, fm_conn *c)
{
    if (c->max_wbuf > 0 && c->out.len > c->max_wbuf) {
        fm__conn_kill(loop, c, 0, FM_R_WBUFFULL);
        return -ENOBUFS;
    }
    if ((c->flags & FM_C_WANT_DRAIN) && c->out.len <= c->low) {
        c->flags |= FM_C_DRAIN_DUE;
        fm__ready_push(loop, c);
    }
    return (int64_t)c->out.len;
}

int64_t fm_send(fm_loop *loop, int cid, const char *data, size_t len)
{
    fm_conn *c = fm__conn_get(loop, cid);
    size_t done = 0;

    if (c == NULL)
        return -EBADF;
    if (c->flags & (FM_C_CLOSING | FM_C_SHUT_WANTED))
        return -EPIPE;
    /* The watermark counts what the handler wrote, before the kernel took
     * any of it: a handler that saw write_buffer_size pass `high` is owed
     * an on_drain even if the send then empties the queue at once. */
    if (c->out.len + len > c->high)
        c->flags |= FM_C_WANT_DRAIN;
    if (c->out.len == 0 && !(c->flags & FM_C_CONNECTING)) {
        int rc = fm__send_some(loop, c, data, len, &done);
        if (rc < 0)
            return rc;
        if (done == len) {
            if (c->flags & FM_C_WANT_DRAIN) {
                c->flags |= FM_C_DRAIN_DUE;
                fm__ready_push(loop, c);
            }
            return 0;
        }
    }
    if (fm__buf_reserve(&c->out, len - done) < 0) {
        fm__conn_kill(loop, c, ENOMEM, FM_R_ERROR);
        return -ENOMEM;
    }
    memcpy(c->out.p + c->out.off + c->out.len, data + done, len - done);
    c->out.len += len - done;
    return fm__queued_checks(loop, c);
}

/* ---- queued writes (the C Connection's path) --------------------------- */

/* Send what fm_queue() left for the end of the iteration: fm_send()'s rules
 * (watermarks, max_write_buffer), outside fm_poll, so a DRAIN it owes goes
 * through the ready list instead of the batch.  Returns 0 or -errno. */
static int fm__send_queued(fm_loop *loop, fm_conn *c)
{
    size_t sent;
    int rc;

    c->flags &= ~FM_C_DIRTY;
    rc = fm__send_some(loop, c, c->out.p + c->out.off, c->out.len, &sent);
    if (rc < 0)
        return rc;
    fm__buf_consume(&c->out, sent);
    return fm__queued_checks(loop, c) < 0 ? -ENOBUFS : 0;
}

/* A big write goes now, behind what was queued before it: one sendmsg over
 * both, so the payload is not copied unless the kernel leaves part of it.
 * Returns the bytes of `data` sent, or -errno after killing the connection. */
static ssize_t fm__send_now(fm_loop *loop, fm_conn *c, const char *data, size_t len)
{
    struct iovec iov[2];
    struct msghdr msg;
    size_t queued = c->out.len;
    ssize_t n;
    int k = 0;

    if (queued > 0) {
        iov[k].iov_base = c->out.p + c->out.off;
        iov[k++].iov_len = queued;
    }
    iov[k].iov_base = (void *)data;
    iov[k++].iov_len = len;
    memset(&msg, 0, sizeof msg);
    msg.msg_iov = iov;
    msg.msg_iovlen = (size_t)k;
    do
        n = sendmsg(c->fd, &msg, MSG_NOSIGNAL);
    while (n < 0 && errno == EINTR);
    if (n < 0) {
        int err = errno;
        if (err == EAGAIN || err == EWOULDBLOCK)
            return 0;
        fm__conn_kill(loop, c, err, FM_R_ERROR);
        return -err;
    }
    loop->stats.writes++;
    loop->stats.bytes_out += (uint64_t)n;
    if ((size_t)n <= queued) {
        fm__buf_consume(&c->out, (size_t)n);
        return 0;
    }
    fm__buf_consume(&c->out, queued);
    return n - (ssize_t)queued;
}

int64_t fm_queue(fm_loop *loop, int cid, const char *data, size_t len)
{
    fm_conn *c = fm__conn_get(loop, cid);
    size_t done = 0;
    int waiting;

    if (c == NULL)
        return -EBADF;
    if (c->flags & (FM_C_CLOSING | FM_C_SHUT_WANTED))
        return -EPIPE;
    if (len == 0)
        return (int64_t)c->out.len;
    loop->stats.messages_out++;
    if (c->out.len + len > c->high)
        c->flags |= FM_C_WANT_DRAIN;
    /* Output the kernel refused earlier waits for EPOLLOUT (and a connect in
     * progress for its completion): new bytes go behind it. */
    waiting = (c->flags & FM_C_CONNECTING) || (c->out.len > 0 && !(c->flags & FM_C_DIRTY));
    /* (Not past what one syscall takes: a send of all it was offered must
     * mean the kernel has room, else nothing would flush the rest.) */
    if (len >= FM_SEND_NOW && !waiting && c->out.len < FM_IO_MAX &&
        len <= FM_IO_MAX - c->out.len) {
        ssize_t n = fm__send_now(loop, c, data, len);
        if (n < 0)
            return n;
        done = (size_t)n;
        c->flags &= ~FM_C_DIRTY; /* what is left waits for EPOLLOUT */
        waiting = c->out.len > 0 || done < len;
    }
    if (done < len) {
        if (fm__buf_reserve(&c->out, len - done) < 0) {
            fm__conn_kill(loop, c, ENOMEM, FM_R_ERROR);
            return -ENOMEM;
        }
        memcpy(c->out.p + c->out.off + c->out.len, data + done, len - done);
        c->out.len += len - done;
    }
    if (waiting || done == len) {
        /* Nothing for fm_flush: fm_send()'s checks apply now. */
        return fm__queued_checks(loop, c);
    }
    if (!(c->flags & FM_C_DIRTY)) {
        if (loop->ndirty == loop->dirty_cap) {
            int cap = loop->dirty_cap ? 2 * loop->dirty_cap : 256;
            int *p = realloc(loop->dirty, (size_t)cap * sizeof *p);
            if (p == NULL) { /* no room to remember it: send it now */
                int rc = fm__send_queued(loop, c);
                return rc < 0 ? rc : (int64_t)c->out.len;
            }
            loop->dirty = p;
            loop->dirty_cap = cap;
        }
        loop->dirty[loop->ndirty++] = c->slot;
        c->flags |= FM_C_DIRTY;
        if (!loop->iterating)
            fm__owe_poll(loop); /* a write between iterations: wake a host */
    }
    return (int64_t)c->out.len;
}

int fm_flush(fm_loop *loop, int end_iteration)
{
    int i, n = 0;

    /* fm__send_queued never queues, so the list cannot grow under us. */
    for (i = 0; i < loop->ndirty; i++) {
        fm_conn *c = fm__conn_get(loop, loop->dirty[i]);
        if (c != NULL && (c->flags & FM_C_DIRTY)) {
            fm__send_queued(loop, c);
            n++;
        }
    }
    loop->ndirty = 0;
    if (end_iteration)
        loop->iterating = 0;
    return n;
}

int64_t fm_flush_conn(fm_loop *loop, int cid)
{
    fm_conn *c = fm__conn_get(loop, cid);
    int rc;

    if (c == NULL)
        return -EBADF;
    if (c->flags & FM_C_DIRTY) {
        rc = fm__send_queued(loop, c);
        if (rc < 0)
            return rc;
    }
    return (int64_t)c->out.len;
}

static const fm_api fm__api = {
    FM_API_ABI, fm_poll, fm_queue, fm_flush, fm_flush_conn, fm_loop_batch,
};

const void *fm_api_table(void)
{
    return &fm__api;
}

/* ---- events ----------------------------------------------------------- */

void fm__conn_io(fm_loop *loop, fm_conn *c, uint32_t ev)
{
    if (c->flags & FM_C_CONNECTING) {
        int err = 0;
        socklen_t len = sizeof err;
        if (!(ev & (EPOLLOUT | EPOLLERR | EPOLLHUP)))
            return;
        if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0)
            err = errno;
        if (err == 0 && (ev & (EPOLLERR | EPOLLHUP)) && !(ev & EPOLLOUT))
            err = ECONNREFUSED;
        if (err != 0) {
            fm__conn_kill(loop, c, err, FM_R_ERROR);
            return;
        }
        c->flags &= ~FM_C_CONNECTING;
        fm__emit(loop, FM_EV_CONNECTED, c->slot, 0, 0);
        if (fm__flush(loop, c) < 0)
            return;
        ev |= EPOLLIN; /* data may have arrived with the handshake */
    }
    if (ev & (EPOLLRDHUP | EPOLLHUP))
        c->flags |= FM_C_RDHUP;
    if (ev & (EPOLLIN | EPOLLERR | EPOLLHUP | EPOLLRDHUP)) {
        if (c->flags & FM_C_CLOSING) {
            fm__discard_input(loop, c);
        } else if (!(c->flags & FM_C_PAUSED)) {
            if (c->flags & FM_C_READY)
                ; /* the ready list will read it */
            else
                fm__conn_read(loop, c);
        }
        if (c->flags & FM_C_DEAD)
            return;
    }
    if ((ev & (EPOLLOUT | EPOLLERR | EPOLLHUP)) && c->out.len > 0)
        fm__flush(loop, c);
}

void fm__conn_process(fm_loop *loop, fm_conn *c)
{
    if (c->flags & FM_C_DRAIN_DUE) {
        c->flags &= ~FM_C_DRAIN_DUE;
        fm__after_flush(loop, c);
    }
    fm__conn_read(loop, c);
}

/* ---- the calls Python makes ------------------------------------------- */

int fm_conn_add(fm_loop *loop, int fd, int framing, int connecting)
{
    fm_conn *c = fm__conn_new(loop, fd, framing, connecting);
    return c ? c->slot : -errno;
}

int fm_conn_set(fm_loop *loop, int cid, uint64_t max_write_buffer, int64_t idle_timeout_ms)
{
    fm_conn *c = fm__conn_get(loop, cid);
    if (c == NULL)
        return -EBADF;
    c->max_wbuf = max_write_buffer;
    fm__idle_set(loop, c, idle_timeout_ms);
    return 0;
}

int fm_close(fm_loop *loop, int cid)
{
    fm_conn *c = fm__conn_get(loop, cid);
    if (c == NULL)
        return -EBADF;
    if ((c->flags & FM_C_DIRTY) && fm__send_queued(loop, c) < 0)
        return 0; /* it died sending: CLOSED is on its way */
    c->flags |= FM_C_CLOSING;
    if (c->out.len == 0 && !(c->flags & FM_C_CONNECTING))
        fm__finish_close(loop, c);
    return 0;
}

int fm_abort(fm_loop *loop, int cid)
{
    fm_conn *c = fm__conn_get(loop, cid);
    if (c == NULL)
        return -EBADF;
    fm__conn_kill(loop, c, 0, FM_R_NONE);
    return 0;
}

int fm_shutdown(fm_loop *loop, int cid)
{
    fm_conn *c = fm__conn_get(loop, cid);
    if (c == NULL)
        return -EBADF;
    if ((c->flags & FM_C_DIRTY) && fm__send_queued(loop, c) < 0)
        return 0;
    c->flags |= FM_C_SHUT_WANTED;
    if (c->out.len == 0 && !(c->flags & (FM_C_CONNECTING | FM_C_SHUT_DONE))) {
        shutdown(c->fd, SHUT_WR);
        c->flags |= FM_C_SHUT_DONE;
    }
    return 0;
}

int fm_pause(fm_loop *loop, int cid)
{
    fm_conn *c = fm__conn_get(loop, cid);
    if (c == NULL)
        return -EBADF;
    c->flags |= FM_C_PAUSED;
    return 0;
}

int fm_resume(fm_loop *loop, int cid)
{
    fm_conn *c = fm__conn_get(loop, cid);
    if (c == NULL)
        return -EBADF;
    if (c->flags & FM_C_PAUSED) {
        c->flags &= ~FM_C_PAUSED;
        c->flags |= FM_C_REFRAME;
        fm__ready_push(loop, c);
    }
    return 0;
}

int fm_set_framing(fm_loop *loop, int cid, int framing)
{
    fm_conn *c = fm__conn_get(loop, cid);
    if (c == NULL)
        return -EBADF;
    if (framing < 0 || framing >= loop->nframings)
        return -EINVAL;
    c->framing = framing;
    c->scan = 0;
    c->flags |= FM_C_REFRAME;
    fm__ready_push(loop, c);
    return 0;
}

int fm_pushback(fm_loop *loop, int cid, const char *data, size_t len, int reemit_eof)
{
    fm_conn *c = fm__conn_get(loop, cid);
    if (c == NULL)
        return -EBADF;
    if (len > 0) {
        if (fm__buf_reserve(&c->in, len) < 0)
            return -ENOMEM;
        /* Make room at the front: the pushed-back bytes came first. */
        memmove(c->in.p + c->in.off + len, c->in.p + c->in.off, c->in.len);
        memcpy(c->in.p + c->in.off, data, len);
        c->in.len += len;
    }
    c->scan = 0;
    if (reemit_eof)
        c->flags &= ~FM_C_EOF_SENT;
    c->flags |= FM_C_REFRAME;
    fm__ready_push(loop, c);
    return 0;
}

int fm_set_write_limits(fm_loop *loop, int cid, uint64_t high, uint64_t low)
{
    fm_conn *c = fm__conn_get(loop, cid);
    if (c == NULL)
        return -EBADF;
    c->high = high;
    c->low = low;
    if (c->out.len > high)
        c->flags |= FM_C_WANT_DRAIN;
    return 0;
}

int64_t fm_write_buffer_size(fm_loop *loop, int cid)
{
    fm_conn *c = fm__conn_get(loop, cid);
    return c ? (int64_t)c->out.len : -EBADF;
}
