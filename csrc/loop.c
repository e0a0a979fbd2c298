/*
 * loop.c -- the epoll instance, one poll, and the batch handed to Python.
 *
 * Some facts about edge-triggered epoll, and what this core does about each.
 *
 * 1. An edge is reported once.  Every connection is registered once, with
 *    EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET, and read until EAGAIN, a short
 *    read, EOF or an error.  A short read on a stream socket proves the
 *    receive queue empty -- except that the FIN may already be queued behind
 *    the data, which is why EPOLLRDHUP is registered: the event then carries
 *    RDHUP and we read on to the 0.
 *
 * 2. Whenever the core stops before EAGAIN -- a connection's per-poll read
 *    budget (FM_READ_BUDGET) is spent, the batch is full, Python paused it,
 *    changed its framing or pushed bytes back -- the kernel will not tell us
 *    again, so the connection goes on the core's own ready list, and the next
 *    poll calls epoll_wait with timeout 0 and serves the ready list after the
 *    kernel's events.  Listeners that spent their accept budget likewise.
 *    This is the application ready list of epoll(7), "Starvation".
 *
 * 3. Stale events.  A connection closed while events for it sit in the
 *    current epoll_wait array, or whose fd number is reused by an accept in
 *    the same poll, must not see them.  epoll_data.u64 holds
 *    gen << 32 | type << 24 | slot, a slot's generation changes on reuse, and
 *    an event whose tag no longer matches is dropped.
 *
 * 4. Lifecycle of a slot.  A dead connection's fd is closed at once, but its
 *    slot lives on: it is put on the dying list, its FM_EV_CLOSED is emitted
 *    at the end of a poll (after all its messages), it becomes a zombie, and
 *    only at the start of the following poll -- once Python has dispatched
 *    the whole batch and forgotten the id -- is the slot freed.  So an id
 *    Python holds never names another connection.
 *
 * 5. Half-close.  Peer FIN: messages first, then FM_EV_EOF; the socket stays
 *    writable.  ERR/HUP: the read returns the error after any data, the
 *    connection dies with FM_R_ERROR after its messages.
 *
 * 6. Being hosted.  The epoll fd is itself pollable.  Once Python has asked
 *    for it (fm_loop_fd), the core keeps it honest: a timerfd armed at the
 *    next Python timer and an eventfd that is signalled whenever the core has
 *    work the kernel will not report (ready list, pending CLOSED events) or
 *    Python has callbacks or writes waiting.
 *
 * The pure-Python select backend (fastmux/_select/) follows the same rules
 * on a level-triggered selector, so both produce the same batches.  It is
 * split as this core is (loop.py, stream.py, listen.py, internal.py) and
 * uses the same function names where the logic is the same.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#include "internal.h"

int64_t fm__now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

uint64_t fm__tag(int type, uint32_t gen, int slot)
{
    return ((uint64_t)gen << 32) | ((uint64_t)type << 24) | ((uint64_t)slot & FM_SLOT_MASK);
}

int64_t fm_const(int which)
{
    switch (which) {
    case FM_CONST_READ_BUDGET: return FM_READ_BUDGET;
    case FM_CONST_ACCEPT_BUDGET: return FM_ACCEPT_BUDGET;
    case FM_CONST_BATCH_MAX: return FM_BATCH_MAX;
    case FM_CONST_READ_CHUNK: return FM_READ_CHUNK;
    case FM_CONST_DEFAULT_HIGH: return FM_DEFAULT_HIGH;
    case FM_CONST_DEFAULT_LOW: return FM_DEFAULT_LOW;
    case FM_CONST_DISCARD_MAX: return FM_DISCARD_MAX;
    case FM_CONST_EMFILE_BACKOFF_MS: return FM_EMFILE_BACKOFF_MS;
    case FM_CONST_SEND_NOW: return FM_SEND_NOW;
    }
    return -1;
}

static int fm__epoll_add(fm_loop *loop, int fd, uint32_t events, uint64_t tag)
{
    struct epoll_event ev;
    memset(&ev, 0, sizeof ev);
    ev.events = events;
    ev.data.u64 = tag;
    if (epoll_ctl(loop->epfd, EPOLL_CTL_ADD, fd, &ev) < 0)
        return -errno;
    return 0;
}

static int fm__open_fds(fm_loop *loop)
{
    loop->epfd = epoll_create1(EPOLL_CLOEXEC);
    if (loop->epfd < 0)
        return -errno;
    loop->wakefd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (loop->wakefd < 0)
        return -errno;
    loop->timerfd = timerfd_create(CLOCK_MONOTONIC, TFD_CLOEXEC | TFD_NONBLOCK);
    if (loop->timerfd < 0)
        return -errno;
    if (fm__epoll_add(loop, loop->wakefd, EPOLLIN | EPOLLET, fm__tag(FM_T_WAKE, 0, 0)) < 0 ||
        fm__epoll_add(loop, loop->timerfd, EPOLLIN | EPOLLET, fm__tag(FM_T_TIMER, 0, 0)) < 0)
        return -errno;
    /* The reserve fd: closed to make room for accept-and-close on EMFILE. */
    loop->reserve_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
    return 0;
}

fm_loop *fm_loop_new(void)
{
    fm_loop *loop = calloc(1, sizeof *loop);
    if (loop == NULL)
        return NULL;
    loop->epfd = loop->wakefd = loop->timerfd = loop->reserve_fd = -1;
    loop->cap = FM_BATCH_MAX + FM_BATCH_SLACK;
    loop->batch.ev = malloc(4 * (size_t)loop->cap * sizeof *loop->batch.ev);
    loop->batch.arena = malloc(FM_ARENA_INIT);
    loop->arena_cap = FM_ARENA_INIT;
    loop->scratch = malloc(FM_READ_CHUNK);
    loop->framings = calloc(FM_MAX_FRAMINGS, sizeof *loop->framings);
    if (!loop->batch.ev || !loop->batch.arena || !loop->scratch ||
        !loop->framings || fm__open_fds(loop) < 0) {
        int saved = errno;
        fm_loop_free(loop);
        errno = saved;
        return NULL;
    }
    return loop;
}

static void fm__close_fd(int *fd)
{
    if (*fd >= 0)
        close(*fd);
    *fd = -1;
}

void fm_loop_free(fm_loop *loop)
{
    int i;
    fm_conn *c, *next;

    if (loop == NULL)
        return;
    for (i = 0; i < loop->conns_hwm; i++) {
        c = loop->conns[i];
        if (c != NULL && !(c->flags & FM_C_DEAD))
            fm__conn_kill(loop, c, 0, FM_R_NONE);
    }
    for (c = loop->dying; c; c = next) {
        next = c->ready_next;
        fm__conn_free(loop, c);
    }
    for (c = loop->zombies; c; c = next) {
        next = c->ready_next;
        fm__conn_free(loop, c);
    }
    fm__close_fd(&loop->epfd);
    fm__close_fd(&loop->wakefd);
    fm__close_fd(&loop->timerfd);
    fm__close_fd(&loop->reserve_fd);
    free(loop->conns);
    free(loop->conn_gens);
    free(loop->free_slots);
    free(loop->listeners);
    free(loop->watches);
    free(loop->dirty);
    free(loop->framings);
    free(loop->batch.ev);
    free(loop->batch.arena);
    free(loop->scratch);
    free(loop);
}

/* In a child after fork(): the epoll instance, eventfd and timerfd are shared
 * with the parent, so touching them (even EPOLL_CTL_DEL) would disturb the
 * parent's loop.  Drop our copies of every fd without a syscall on shared
 * state other than close(), and leave the loop unusable. */
int fm_loop_after_fork(fm_loop *loop)
{
    int i;
    fm_conn *c;

    loop->forked = 1;
    for (i = 0; i < loop->conns_hwm; i++) {
        c = loop->conns[i];
        if (c != NULL && c->fd >= 0)
            fm__close_fd(&c->fd);
    }
    fm__close_fd(&loop->epfd);
    fm__close_fd(&loop->wakefd);
    fm__close_fd(&loop->timerfd);
    fm__close_fd(&loop->reserve_fd);
    return 0;
}

int fm_loop_fd(fm_loop *loop)
{
    loop->hosted = 1;
    return loop->epfd;
}

fm_batch *fm_loop_batch(fm_loop *loop) { return &loop->batch; }

fm_stats *fm_loop_stats(fm_loop *loop) { return &loop->stats; }

/* Full: no more reads this poll.  The arena bound keeps a batch of many
 * large reads from growing memory; one message larger than it still fits. */
int fm__batch_full(fm_loop *loop)
{
    return loop->batch.n >= FM_BATCH_MAX || loop->batch.used >= FM_ARENA_SOFT;
}

int fm__emit(fm_loop *loop, int kind, int id, uint32_t start, uint32_t end)
{
    int n = loop->batch.n;
    uint32_t *ev;
    if ((uint32_t)n >= loop->cap)
        return -1;
    ev = loop->batch.ev + 4 * (size_t)n;
    ev[0] = (uint32_t)kind;
    ev[1] = (uint32_t)id;
    ev[2] = start;
    ev[3] = end;
    loop->batch.n = n + 1;
    return 0;
}

char *fm__arena_reserve(fm_loop *loop, size_t n)
{
    size_t need = loop->batch.used + n;
    if (need > loop->arena_cap) {
        size_t cap = loop->arena_cap;
        char *p;
        while (cap < need)
            cap *= 2;
        if (cap > UINT32_MAX)
            return NULL;
        p = realloc(loop->batch.arena, cap);
        if (p == NULL)
            return NULL;
        loop->batch.arena = p;
        loop->arena_cap = cap;
    }
    return loop->batch.arena + loop->batch.used;
}

void fm__ready_push(fm_loop *loop, fm_conn *c)
{
    if (c->flags & (FM_C_READY | FM_C_DEAD))
        return;
    c->flags |= FM_C_READY;
    c->ready_next = NULL;
    if (loop->ready_tail)
        loop->ready_tail->ready_next = c;
    else
        loop->ready_head = c;
    loop->ready_tail = c;
    fm__owe_poll(loop);
}

/* Work was queued for the next poll (ready list, dying list).  Inside
 * fm_poll the end of the poll takes care of a host; outside it (Python
 * called fm_resume, fm_close, fm_set_framing ... between iterations) a
 * hosting loop must see the fd become readable now, or it sleeps with our
 * work queued. */
void fm__owe_poll(fm_loop *loop)
{
    if (loop->hosted && !loop->in_poll)
        fm_wakeup(loop);
}

fm_conn *fm__conn_get(fm_loop *loop, int cid)
{
    fm_conn *c;
    if (cid < 0 || cid >= loop->conns_hwm)
        return NULL;
    c = loop->conns[cid];
    if (c == NULL || (c->flags & FM_C_DEAD))
        return NULL;
    return c;
}

int fm_has_pending(fm_loop *loop)
{
    int lid;
    /* ndirty: fm_queue'd writes wait for fm_flush, which the next iteration
     * does first (a write made before the loop was hosted woke nobody). */
    if (loop->ready_head != NULL || loop->dying != NULL || loop->ndirty > 0)
        return 1;
    for (lid = 0; loop->listeners_ready && lid < loop->nlisteners; lid++)
        if (loop->listeners[lid].active && loop->listeners[lid].ready &&
            loop->listeners[lid].backoff_until == 0)
            return 1;
    return 0;
}

int fm_wakeup(fm_loop *loop)
{
    uint64_t one = 1;
    if (__atomic_exchange_n(&loop->wake_pending, 1, __ATOMIC_ACQ_REL))
        return 0;
    if (write(loop->wakefd, &one, sizeof one) < 0 && errno != EAGAIN)
        return -errno;
    return 0;
}

int fm_set_timer(fm_loop *loop, int64_t deadline_ns)
{
    struct itimerspec its;
    memset(&its, 0, sizeof its);
    if (deadline_ns >= 0) {
        if (deadline_ns == 0)
            deadline_ns = 1; /* all-zero would disarm */
        its.it_value.tv_sec = deadline_ns / 1000000000;
        its.it_value.tv_nsec = deadline_ns % 1000000000;
    }
    if (timerfd_settime(loop->timerfd, TFD_TIMER_ABSTIME, &its, NULL) < 0)
        return -errno;
    return 0;
}

int fm_framing_new(fm_loop *loop, int kind, uint64_t max_size, uint32_t n,
                   const char *sep, size_t seplen, int little_endian)
{
    fm_framing *f;
    if (loop->nframings >= FM_MAX_FRAMINGS)
        return -ENOSPC;
    if (kind < FM_FR_RAW || kind > FM_FR_FIXED || seplen > sizeof f->sep)
        return -EINVAL;
    if ((kind == FM_FR_DELIM && seplen == 0) ||
        (kind == FM_FR_LENGTH && n != 1 && n != 2 && n != 4 && n != 8) ||
        (kind == FM_FR_FIXED && n == 0))
        return -EINVAL;
    f = &loop->framings[loop->nframings];
    f->kind = kind;
    f->max = max_size;
    f->n = n;
    f->little = little_endian;
    f->seplen = seplen;
    if (seplen)
        memcpy(f->sep, sep, seplen);
    return loop->nframings++;
}

static uint32_t fm__watch_epoll_events(int events)
{
    /* Level-triggered on purpose: the owner reads a little at a time. */
    return ((events & FM_WATCH_READ) ? EPOLLIN : 0u) |
           ((events & FM_WATCH_WRITE) ? EPOLLOUT : 0u);
}

int fm_watch_add(fm_loop *loop, int fd, int events)
{
    int wid;
    fm_watch *w;
    for (wid = 0; wid < loop->nwatches; wid++)
        if (!loop->watches[wid].active)
            break;
    if (wid == loop->nwatches) {
        w = realloc(loop->watches, (size_t)(wid + 1) * sizeof *w);
        if (w == NULL)
            return -ENOMEM;
        loop->watches = w;
        memset(&w[wid], 0, sizeof *w);
        loop->nwatches++;
    }
    w = &loop->watches[wid];
    w->gen++;
    int rc = fm__epoll_add(loop, fd, fm__watch_epoll_events(events),
                           fm__tag(FM_T_WATCH, w->gen, wid));
    if (rc < 0)
        return rc;
    w->fd = fd;
    w->events = events;
    w->active = 1;
    return wid;
}

int fm_watch_set(fm_loop *loop, int wid, int events)
{
    struct epoll_event ev;
    fm_watch *w;
    if (wid < 0 || wid >= loop->nwatches || !loop->watches[wid].active)
        return -EBADF;
    w = &loop->watches[wid];
    memset(&ev, 0, sizeof ev);
    ev.events = fm__watch_epoll_events(events);
    ev.data.u64 = fm__tag(FM_T_WATCH, w->gen, wid);
    if (epoll_ctl(loop->epfd, EPOLL_CTL_MOD, w->fd, &ev) < 0)
        return -errno;
    w->events = events;
    return 0;
}

int fm_watch_remove(fm_loop *loop, int wid)
{
    fm_watch *w;
    if (wid < 0 || wid >= loop->nwatches || !loop->watches[wid].active)
        return -EBADF;
    w = &loop->watches[wid];
    epoll_ctl(loop->epfd, EPOLL_CTL_DEL, w->fd, NULL);
    w->active = 0;
    w->gen++;
    return 0;
}

/* Emit CLOSED for dead connections, oldest first, as far as the batch has
 * room; the rest wait for the next poll. */
static void fm__flush_dying(fm_loop *loop)
{
    fm_conn *c, *rev = NULL;
    /* The dying list is LIFO; reverse it so CLOSED events keep death order. */
    while ((c = loop->dying) != NULL) {
        loop->dying = c->ready_next;
        c->ready_next = rev;
        rev = c;
    }
    while ((c = rev) != NULL) {
        if ((uint32_t)loop->batch.n >= loop->cap)
            break;
        rev = c->ready_next;
        fm__emit(loop, FM_EV_CLOSED, c->slot, (uint32_t)c->close_errno,
                 (uint32_t)c->close_reason);
        c->ready_next = loop->zombies;
        loop->zombies = c;
    }
    /* Put back what did not fit, in LIFO order again. */
    while ((c = rev) != NULL) {
        rev = c->ready_next;
        c->ready_next = loop->dying;
        loop->dying = c;
    }
}

static void fm__run_ready(fm_loop *loop)
{
    fm_conn *c = loop->ready_head, *next;
    loop->ready_head = loop->ready_tail = NULL;
    for (; c != NULL; c = next) {
        next = c->ready_next;
        c->flags &= ~FM_C_READY;
        c->ready_next = NULL;
        if (c->flags & FM_C_DEAD)
            continue;
        if (fm__batch_full(loop)) {
            fm__ready_push(loop, c);
            continue;
        }
        fm__conn_process(loop, c);
    }
}

/* Start a poll: free the zombies, empty the batch, emit what is owed, and
 * shorten timeout_ms to the next idle timeout or accept back-off (0 when the
 * core has work the kernel will not report). */
static int fm__poll_begin(fm_loop *loop, int timeout_ms)
{
    fm_conn *c;
    int64_t now, wait_until;

    /* Zombies: Python saw their CLOSED in the previous batch. */
    while ((c = loop->zombies) != NULL) {
        loop->zombies = c->ready_next;
        fm__conn_free(loop, c);
    }
    loop->batch.n = 0;
    loop->batch.used = 0;
    loop->stats.polls++;

    fm__flush_dying(loop);
    now = fm__now_ms();
    wait_until = fm__idle_sweep(loop, now);
    if (loop->listeners_ready) {
        int64_t t = fm__listeners_run(loop, now);
        if (t >= 0 && (wait_until < 0 || t < wait_until))
            wait_until = t;
    }
    if (wait_until >= 0) {
        int64_t d = wait_until - now;
        if (d < 0)
            d = 0;
        if (timeout_ms < 0 || d < timeout_ms)
            timeout_ms = (int)d;
    }
    if (loop->batch.n > 0 || loop->ready_head != NULL || loop->dying != NULL)
        timeout_ms = 0;
    return timeout_ms;
}

/* One event from epoll_wait; stale ones (generation mismatch) are dropped. */
static void fm__kernel_event(fm_loop *loop, const struct epoll_event *e)
{
    uint64_t tag = e->data.u64;
    int type = (int)((tag >> 24) & 0xff);
    int slot = (int)(tag & FM_SLOT_MASK);
    uint32_t gen = (uint32_t)(tag >> 32);
    uint64_t v;
    fm_conn *c;

    switch (type) {
    case FM_T_CONN:
        if (slot < loop->conns_hwm && (c = loop->conns[slot]) != NULL &&
            c->gen == gen && !(c->flags & FM_C_DEAD))
            fm__conn_io(loop, c, e->events);
        break;
    case FM_T_LISTENER:
        if (slot < loop->nlisteners && loop->listeners[slot].active &&
            loop->listeners[slot].gen == gen)
            fm__listener_io(loop, slot);
        break;
    case FM_T_WATCH:
        if (slot < loop->nwatches && loop->watches[slot].active &&
            loop->watches[slot].gen == gen) {
            /* As selectors does: an error or hang-up is both readable and
             * writable, for whichever the owner waits for. */
            uint32_t ev = e->events;
            int ready = ((ev & ~(uint32_t)EPOLLOUT) ? FM_WATCH_READ : 0) |
                        ((ev & ~(uint32_t)EPOLLIN) ? FM_WATCH_WRITE : 0);
            ready &= loop->watches[slot].events;
            if (ready)
                fm__emit(loop, FM_EV_WATCH, slot, (uint32_t)ready, 0);
        }
        break;
    case FM_T_WAKE:
        /* Drain first, then clear: a wake-up made between the two finds
         * the flag still set and writes nothing, but its work is already
         * queued and Python looks at its queues after this poll.  Clearing
         * first would let that write land before the drain and be eaten,
         * leaving the flag set over an empty eventfd: every later
         * fm_wakeup() would then write nothing and the loop could sleep
         * with work queued. */
        while (read(loop->wakefd, &v, sizeof v) > 0)
            ;
        __atomic_store_n(&loop->wake_pending, 0, __ATOMIC_RELEASE);
        break;
    case FM_T_TIMER:
        while (read(loop->timerfd, &v, sizeof v) > 0)
            ;
        break;
    }
}

static int fm__poll(fm_loop *loop, int timeout_ms)
{
    int n, i;

    if (loop->forked)
        return -EBADF;
    timeout_ms = fm__poll_begin(loop, timeout_ms);
    n = epoll_wait(loop->epfd, loop->events, FM_MAX_EVENTS, timeout_ms);
    if (n < 0) {
        if (errno != EINTR)
            return -errno;
        n = 0; /* a signal: let Python run its handler */
    }
    for (i = 0; i < n; i++)
        fm__kernel_event(loop, &loop->events[i]);
    fm__run_ready(loop);
    if (loop->listeners_ready)
        fm__listeners_run(loop, fm__now_ms());
    fm__flush_dying(loop);
    /* Work the kernel will not report: keep a hosting loop's fd readable. */
    if (loop->hosted && fm_has_pending(loop))
        fm_wakeup(loop);
    return loop->batch.n;
}

int fm_poll(fm_loop *loop, int timeout_ms)
{
    int n;
    loop->in_poll = 1;
    loop->iterating = 1;
    n = fm__poll(loop, timeout_ms);
    loop->in_poll = 0;
    return n;
}
