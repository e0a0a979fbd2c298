/*
 * listen.c -- accepting connections.
 *
 * A listener is registered edge-triggered like a connection, so it is
 * accepted from until EAGAIN -- but at most FM_ACCEPT_BUDGET connections per
 * poll, so a connection storm cannot starve established peers; a listener
 * that spent its budget is marked ready and served again by the next poll,
 * which does not block.
 *
 * Out of file descriptors (EMFILE/ENFILE) the kernel keeps the connection in
 * the backlog and keeps the listener readable, which would make a
 * level-triggered loop spin and an edge-triggered one forget the backlog.
 * We use libuv's reserve-fd trick: close the spare fd we hold, accept and
 * close every pending connection (the peers see an orderly close instead of
 * a hang), reopen the spare.  Without a spare, we stop accepting for
 * FM_EMFILE_BACKOFF_MS and try again (nginx's approach).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "internal.h"

int fm_listener_add(fm_loop *loop, int fd, int framing, int64_t max_connections)
{
    struct epoll_event ev;
    fm_listener *l;
    int lid, flags;

    if (framing < 0 || framing >= loop->nframings)
        return -EINVAL;
    /* Accepting until EAGAIN needs a non-blocking listener: a blocking one
     * would block the whole poll in accept4 once the backlog is empty.  The
     * fd is borrowed, but its flags are ours to set (as the select backend
     * does). */
    flags = fcntl(fd, F_GETFL);
    if (flags < 0 || (!(flags & O_NONBLOCK) && fcntl(fd, F_SETFL, flags | O_NONBLOCK) < 0))
        return -errno;
    for (lid = 0; lid < loop->nlisteners; lid++)
        if (!loop->listeners[lid].active && loop->listeners[lid].nconns == 0)
            break;
    if (lid == loop->nlisteners) {
        l = realloc(loop->listeners, (size_t)(lid + 1) * sizeof *l);
        if (l == NULL)
            return -ENOMEM;
        loop->listeners = l;
        memset(&l[lid], 0, sizeof *l);
        loop->nlisteners++;
    }
    l = &loop->listeners[lid];
    l->gen++;
    memset(&ev, 0, sizeof ev);
    ev.events = EPOLLIN | EPOLLET;
    ev.data.u64 = fm__tag(FM_T_LISTENER, l->gen, lid);
    if (epoll_ctl(loop->epfd, EPOLL_CTL_ADD, fd, &ev) < 0)
        return -errno;
    l->fd = fd;
    l->framing = framing;
    l->active = 1;
    l->ready = 0;
    l->backoff_until = 0;
    l->max_conns = max_connections;
    l->nconns = 0;
    l->max_wbuf = 0;
    l->idle_ms = 0;
    /* A backlog that filled before we registered gives no edge. */
    l->ready = 1;
    loop->listeners_ready = 1;
    return lid;
}

int fm_listener_set(fm_loop *loop, int lid, uint64_t max_write_buffer, int64_t idle_timeout_ms)
{
    if (lid < 0 || lid >= loop->nlisteners || !loop->listeners[lid].active)
        return -EBADF;
    loop->listeners[lid].max_wbuf = max_write_buffer;
    loop->listeners[lid].idle_ms = idle_timeout_ms;
    return 0;
}

int fm_listener_remove(fm_loop *loop, int lid)
{
    fm_listener *l;
    if (lid < 0 || lid >= loop->nlisteners || !loop->listeners[lid].active)
        return -EBADF;
    l = &loop->listeners[lid];
    epoll_ctl(loop->epfd, EPOLL_CTL_DEL, l->fd, NULL);
    l->active = 0;
    l->ready = 0;
    l->gen++;
    l->fd = -1;
    return 0;
}

/* Accept and close everything pending, using the reserve fd. */
static int fm__emfile(fm_loop *loop, fm_listener *l)
{
    loop->stats.emfile++;
    if (loop->reserve_fd < 0)
        return -1;
    close(loop->reserve_fd);
    loop->reserve_fd = -1;
    for (;;) {
        int fd = accept4(l->fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED)
                continue;
            break;
        }
        close(fd);
        loop->stats.rejected++;
    }
    loop->reserve_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
    return 0;
}

/* Stop accepting on l for FM_EMFILE_BACKOFF_MS; fm__listeners_run retries. */
static void fm__backoff(fm_loop *loop, fm_listener *l)
{
    l->backoff_until = fm__now_ms() + FM_EMFILE_BACKOFF_MS;
    l->ready = 1;
    loop->listeners_ready = 1;
}

/* accept4() on l failed with err.  Returns 1 to accept the next connection,
 * 0 to stop serving l in this poll (drained, or backing off). */
static int fm__accept_failed(fm_loop *loop, fm_listener *l, int err)
{
    switch (err) {
    case EAGAIN:
#if EAGAIN != EWOULDBLOCK
    case EWOULDBLOCK:
#endif
        return 0;
    case EMFILE:
    case ENFILE:
    case ENOBUFS:
    case ENOMEM:
        if (fm__emfile(loop, l) < 0)
            fm__backoff(loop, l);
        return 0;
    case EINTR:
    case ECONNABORTED:
    case EPROTO:
    case ENETDOWN:
    case ENOPROTOOPT:
    case EHOSTDOWN:
#ifdef ENONET
    case ENONET:
#endif
    case EHOSTUNREACH:
    case EOPNOTSUPP:
    case ENETUNREACH:
    case EPERM:
    case ECONNRESET:
        /* This connection died in the backlog, or accept(2) passed
         * a pending network error through: go on with the next. */
        return 1;
    default:
        /* The listener itself is unusable (EBADF, EINVAL, ...):
         * retrying at once would spin, so back off as for EMFILE
         * (the select backend does the same). */
        fm__backoff(loop, l);
        return 0;
    }
}

/* An accepted fd becomes a connection of listener lid, or is refused
 * (closed at once) at max_connections or when out of memory. */
static void fm__on_accepted(fm_loop *loop, int lid, int fd)
{
    fm_listener *l = &loop->listeners[lid];
    fm_conn *c;

    if (l->max_conns >= 0 && l->nconns >= l->max_conns) {
        close(fd);
        loop->stats.rejected++;
        return;
    }
    c = fm__conn_new(loop, fd, l->framing, 0);
    if (c == NULL) {
        close(fd);
        loop->stats.rejected++;
        return;
    }
    c->lid = lid;
    c->max_wbuf = l->max_wbuf;
    l->nconns++;
    loop->stats.accepted++;
    fm__emit(loop, FM_EV_ACCEPT, c->slot, (uint32_t)lid, (uint32_t)fd);
    if (l->idle_ms > 0)
        fm__idle_set(loop, c, l->idle_ms);
    /* Data may be waiting already; the ready list reads it this poll. */
    fm__ready_push(loop, c);
}

/* Accept until EAGAIN, at most FM_ACCEPT_BUDGET connections, while the
 * batch has room; stopped early, the listener is served again next poll. */
void fm__listener_io(fm_loop *loop, int lid)
{
    fm_listener *l = &loop->listeners[lid];
    int budget = FM_ACCEPT_BUDGET;

    l->ready = 0;
    if (l->backoff_until > 0) {
        loop->listeners_ready = 1; /* still backing off: retry then */
        l->ready = 1;
        return;
    }
    while (l->active) {
        int fd;

        if (budget-- == 0 || fm__batch_full(loop)) {
            l->ready = 1;
            loop->listeners_ready = 1;
            return;
        }
        fd = accept4(l->fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (fm__accept_failed(loop, l, errno))
                continue;
            return;
        }
        fm__on_accepted(loop, lid, fd);
    }
}

/* Serve listeners that spent their budget or are backing off.  Returns the
 * earliest back-off deadline (ms), or -1. */
int64_t fm__listeners_run(fm_loop *loop, int64_t now)
{
    int lid;
    int64_t next = -1;
    loop->listeners_ready = 0;
    for (lid = 0; lid < loop->nlisteners; lid++) {
        fm_listener *l = &loop->listeners[lid];
        if (!l->active || !l->ready)
            continue;
        if (l->backoff_until > 0) {
            if (l->backoff_until > now) {
                loop->listeners_ready = 1;
                if (next < 0 || l->backoff_until < next)
                    next = l->backoff_until;
                continue;
            }
            l->backoff_until = 0;
        }
        fm__listener_io(loop, lid);
    }
    return next;
}
