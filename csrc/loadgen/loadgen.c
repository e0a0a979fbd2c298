/* fastmux load generator and minimal C reference server.  See loadgen.h.
 *
 * The generator is single-threaded edge-triggered epoll.  It is the bench's
 * bottleneck at depth 1 on a 2-CPU machine, so it is frugal with syscalls:
 * it stops reading at a short read (safe on stream sockets with EPOLLRDHUP
 * registered: new data raises a new edge), sends each request with one
 * write, and takes one clock reading per read.
 *
 * Verification: in LG_RAW every payload starts with an 8-byte key
 * (connection << 40 | sequence) followed by a pattern that depends on the
 * key, and the echo must equal the requests in flight byte for byte, as one
 * stream (a pipelined Raw server may cut it anywhere).  LG_LINES lines
 * carry the key in hex.  LG_HTTP checks the status line, Content-Length
 * and the body.  A mismatch counts an error; bytes that cannot be resynced
 * (more data than was asked for, an unparseable response) drop the
 * connection and count a connection error too.
 */
#define _GNU_SOURCE
#include "loadgen.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define LINE_LEN 64
#define SCRATCH (256 * 1024)
#define MAX_EVENTS 512
#define HTTP_MAX_HEAD 8192

static const char HTTP_REQ[] = "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";
static const char HTTP_RESP[] =
    "HTTP/1.1 200 OK\r\nContent-Length: 13\r\nContent-Type: text/plain\r\n\r\nHello, world!";
static const char HTTP_BODY[] = "Hello, world!";

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* ---- histogram: log-linear, 64 sub-buckets per power of two (~1.6 %) ---- */

static int hist_index(uint64_t v) {
    if (v < 64)
        return (int)v;
    int e = 63 - __builtin_clzll(v); /* e >= 6 */
    int idx = (e - 5) * 64 + (int)((v >> (e - 6)) & 63);
    return idx < LG_HIST_BUCKETS ? idx : LG_HIST_BUCKETS - 1;
}

/* The midpoint of bucket `i`, in ns. */
static double hist_value(int i) {
    if (i < 64)
        return (double)i;
    int e = i / 64 + 5, sub = i % 64;
    double lo = (double)((64ull + (uint64_t)sub) << (e - 6));
    return lo + (double)(1ull << (e - 6)) / 2.0;
}

/* ---- payload formats ---- */

static inline uint64_t key_of(uint32_t conn, uint64_t seq) {
    return ((uint64_t)conn << 40) | (seq & ((1ull << 40) - 1));
}

static void fill_raw(unsigned char *out, int size, uint64_t key) {
    memcpy(out, &key, 8); /* size >= 8 is checked by lg_open */
    unsigned char b = (unsigned char)(key * 2654435761u >> 7);
    for (int i = 8; i < size; i++)
        out[i] = (unsigned char)(b + (unsigned)i * 7u);
}

static void fill_line(unsigned char *out, uint64_t key) {
    static const char hex[] = "0123456789abcdef";
    for (int i = 0; i < 16; i++)
        out[i] = (unsigned char)hex[(key >> (60 - 4 * i)) & 15];
    for (int i = 16; i < LINE_LEN - 1; i++)
        out[i] = (unsigned char)('a' + (key + (uint64_t)i) % 26);
    out[LINE_LEN - 1] = '\n';
}

int lg_format(int mode, int size, uint32_t conn, uint64_t seq, unsigned char *out, int cap) {
    uint64_t key = key_of(conn, seq);
    if (mode == LG_RAW) {
        if (size < 8 || size > cap)
            return -1;
        fill_raw(out, size, key);
        return size;
    }
    if (mode == LG_LINES) {
        if (cap < LINE_LEN)
            return -1;
        fill_line(out, key);
        return LINE_LEN;
    }
    return -1;
}

/* ---- growable byte buffer ---- */

typedef struct {
    unsigned char *p;
    size_t len, off, cap;
} buf_t;

static int buf_reserve(buf_t *b, size_t extra) {
    if (b->off > 0 && b->off == b->len) {
        b->off = b->len = 0;
    }
    if (b->len + extra <= b->cap)
        return 0;
    if (b->off > 0) { /* compact before growing */
        memmove(b->p, b->p + b->off, b->len - b->off);
        b->len -= b->off;
        b->off = 0;
        if (b->len + extra <= b->cap)
            return 0;
    }
    size_t ncap = b->cap ? b->cap : 4096;
    while (ncap < b->len + extra)
        ncap *= 2;
    unsigned char *np = realloc(b->p, ncap);
    if (!np)
        return -1;
    b->p = np;
    b->cap = ncap;
    return 0;
}

static int buf_append(buf_t *b, const void *src, size_t n) {
    if (buf_reserve(b, n) < 0)
        return -1;
    memcpy(b->p + b->len, src, n);
    b->len += n;
    return 0;
}

/* ---- the generator ---- */

typedef struct {
    int fd;
    uint32_t id;
    int connected, dead;
    uint64_t seq_sent, seq_recv;
    buf_t tx;          /* unsent request bytes                       */
    buf_t rx;          /* partial responses (LG_LINES, LG_HTTP)      */
    unsigned char *req; /* LG_RAW: the request in flight = the expected echo */
    size_t rxpos;      /* LG_RAW: bytes of the echo received so far  */
    uint64_t *sent_ns; /* send time per in-flight request (ring of depth) */
} conn_t;

struct lg_gen {
    int epfd, mode, size, depth, nconns;
    conn_t *conns;
    unsigned char *scratch;
    uint64_t hist[LG_HIST_BUCKETS];
    lg_result r; /* counters of the current drive */
    int record;
    int draining;   /* lg_quiesce: answer nothing, send nothing new */
    uint64_t last_progress;
};

static void conn_kill(lg_gen *g, conn_t *c) {
    if (c->dead)
        return;
    c->dead = 1;
    g->r.conn_errors++;
    epoll_ctl(g->epfd, EPOLL_CTL_DEL, c->fd, NULL);
}

/* Send what is queued in c->tx until done or EAGAIN. */
static void conn_flush(lg_gen *g, conn_t *c) {
    while (c->tx.off < c->tx.len) {
        ssize_t n = send(c->fd, c->tx.p + c->tx.off, c->tx.len - c->tx.off, MSG_NOSIGNAL);
        g->r.writes++;
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno != EAGAIN && errno != EWOULDBLOCK)
                conn_kill(g, c);
            return; /* EPOLLOUT (registered ET) resumes us */
        }
        g->r.bytes_out += (uint64_t)n;
        c->tx.off += (size_t)n;
    }
    c->tx.off = c->tx.len = 0;
}

/* Queue `count` new requests and send them in one write. */
static void send_requests(lg_gen *g, conn_t *c, int count, uint64_t t) {
    if (count <= 0 || c->dead || g->draining)
        return;
    if (g->mode == LG_RAW) {
        /* c->req holds the `depth` requests in flight, slot seq % depth:
         * what the echo must equal. */
        for (int i = 0; i < count; i++) {
            unsigned char *slot = c->req + (c->seq_sent % (uint64_t)g->depth) * (size_t)g->size;
            fill_raw(slot, g->size, key_of(c->id, c->seq_sent));
            c->sent_ns[c->seq_sent % (uint64_t)g->depth] = t;
            c->seq_sent++;
            if (buf_append(&c->tx, slot, (size_t)g->size) < 0) {
                conn_kill(g, c);
                return;
            }
        }
    } else if (g->mode == LG_LINES) {
        if (buf_reserve(&c->tx, (size_t)count * LINE_LEN) < 0) {
            conn_kill(g, c);
            return;
        }
        for (int i = 0; i < count; i++) {
            fill_line(c->tx.p + c->tx.len, key_of(c->id, c->seq_sent));
            c->tx.len += LINE_LEN;
            c->sent_ns[c->seq_sent % (uint64_t)g->depth] = t;
            c->seq_sent++;
        }
    } else {
        if (buf_append(&c->tx, HTTP_REQ, sizeof HTTP_REQ - 1) < 0) {
            conn_kill(g, c);
            return;
        }
        c->sent_ns[0] = t;
        c->seq_sent++;
    }
    conn_flush(g, c);
}

static void got_response(lg_gen *g, uint64_t sent, uint64_t t) {
    g->r.msgs++;
    if (g->record && t >= sent)
        g->hist[hist_index(t - sent)]++;
}

static void on_raw(lg_gen *g, conn_t *c, const unsigned char *p, size_t n, uint64_t t) {
    /* The echo is the byte stream of the requests in flight, in order, cut
     * wherever the server's reads and writes cut it. */
    int done = 0;
    while (n > 0) {
        if (c->seq_recv >= c->seq_sent) {
            g->r.errors++; /* bytes nobody asked for: cannot resync */
            conn_kill(g, c);
            return;
        }
        uint64_t slot = c->seq_recv % (uint64_t)g->depth;
        const unsigned char *want = c->req + slot * (size_t)g->size + c->rxpos;
        size_t take = (size_t)g->size - c->rxpos;
        if (take > n)
            take = n;
        if (memcmp(p, want, take) != 0)
            g->r.errors++;
        c->rxpos += take;
        p += take;
        n -= take;
        if (c->rxpos == (size_t)g->size) {
            c->rxpos = 0;
            c->seq_recv++;
            got_response(g, c->sent_ns[slot], t);
            done++;
        }
    }
    /* Keep `depth` requests in flight: refill what came back, in one write. */
    send_requests(g, c, done, t);
}

static void on_lines(lg_gen *g, conn_t *c, const unsigned char *p, size_t n, uint64_t t) {
    if (buf_append(&c->rx, p, n) < 0) {
        conn_kill(g, c);
        return;
    }
    unsigned char expect[LINE_LEN];
    int done = 0;
    while (c->rx.len - c->rx.off >= LINE_LEN) {
        const unsigned char *line = c->rx.p + c->rx.off;
        if (c->seq_recv >= c->seq_sent) {
            g->r.errors++;
            conn_kill(g, c);
            return;
        }
        fill_line(expect, key_of(c->id, c->seq_recv));
        if (memcmp(line, expect, LINE_LEN) != 0) {
            g->r.errors++;
            /* Resync on the next newline so one bad line costs one error. */
            const unsigned char *nl = memchr(line, '\n', c->rx.len - c->rx.off);
            if (nl == NULL || (size_t)(nl - line) + 1 != LINE_LEN) {
                conn_kill(g, c);
                return;
            }
        }
        got_response(g, c->sent_ns[c->seq_recv % (uint64_t)g->depth], t);
        c->seq_recv++;
        c->rx.off += LINE_LEN;
        done++;
    }
    if (c->rx.off == c->rx.len)
        c->rx.off = c->rx.len = 0;
    /* Keep `depth` lines in flight: refill what came back, in one write. */
    send_requests(g, c, done, t);
}

static void on_http(lg_gen *g, conn_t *c, const unsigned char *p, size_t n, uint64_t t) {
    if (buf_append(&c->rx, p, n) < 0) {
        conn_kill(g, c);
        return;
    }
    for (;;) {
        const char *s = (const char *)c->rx.p + c->rx.off;
        size_t avail = c->rx.len - c->rx.off;
        const char *hend = memmem(s, avail, "\r\n\r\n", 4);
        if (hend == NULL) {
            if (avail > HTTP_MAX_HEAD) {
                g->r.errors++;
                conn_kill(g, c);
            }
            return;
        }
        size_t hlen = (size_t)(hend - s) + 4;
        long clen = -1;
        for (const char *q = s; q < hend;) {
            const char *eol = memmem(q, (size_t)(hend - q) + 2, "\r\n", 2);
            if (eol == NULL)
                break;
            if ((size_t)(eol - q) > 15 && strncasecmp(q, "Content-Length:", 15) == 0)
                clen = strtol(q + 15, NULL, 10);
            q = eol + 2;
        }
        if (clen < 0 || clen > 1 << 20 || c->seq_recv >= c->seq_sent) {
            g->r.errors++;
            conn_kill(g, c);
            return;
        }
        if (avail < hlen + (size_t)clen)
            return; /* body not complete yet */
        if (strncmp(s, "HTTP/1.1 200 ", 13) != 0 || clen != (long)sizeof HTTP_BODY - 1 ||
            memcmp(s + hlen, HTTP_BODY, sizeof HTTP_BODY - 1) != 0)
            g->r.errors++;
        c->rx.off += hlen + (size_t)clen;
        c->seq_recv++;
        got_response(g, c->sent_ns[0], t);
        send_requests(g, c, 1, t);
        if (c->dead)
            return;
    }
}

static void conn_read(lg_gen *g, conn_t *c, uint32_t ev) {
    for (;;) {
        ssize_t n = recv(c->fd, g->scratch, SCRATCH, 0);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno != EAGAIN && errno != EWOULDBLOCK)
                conn_kill(g, c);
            return;
        }
        if (n == 0) {
            conn_kill(g, c); /* the server closed on us */
            return;
        }
        uint64_t t = now_ns();
        g->r.bytes_in += (uint64_t)n;
        g->last_progress = t;
        if (g->mode == LG_RAW)
            on_raw(g, c, g->scratch, (size_t)n, t);
        else if (g->mode == LG_LINES)
            on_lines(g, c, g->scratch, (size_t)n, t);
        else
            on_http(g, c, g->scratch, (size_t)n, t);
        if (c->dead)
            return;
        /* A short read drained the socket (see the file comment). */
        if ((size_t)n < SCRATCH && !(ev & (EPOLLRDHUP | EPOLLHUP | EPOLLERR)))
            return;
    }
}

static void conn_start(lg_gen *g, conn_t *c, uint64_t t) {
    int err = 0;
    socklen_t len = sizeof err;
    if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0 || err != 0) {
        conn_kill(g, c);
        return;
    }
    c->connected = 1;
    send_requests(g, c, g->depth, t);
}

lg_gen *lg_open(int port, int ipv6, int nconns, int mode, int size, int depth) {
    if (port <= 0 || port > 65535 || nconns <= 0 || nconns > 65536 || mode < LG_RAW ||
        mode > LG_HTTP || (mode == LG_RAW && (size < 8 || size > (16 << 20))) ||
        (mode != LG_HTTP && (depth < 1 || depth > 4096)) ||
        (mode == LG_RAW && (size_t)size * (size_t)depth > (64u << 20))) {
        errno = EINVAL;
        return NULL;
    }
    if (mode == LG_HTTP)
        depth = 1;
    lg_gen *g = calloc(1, sizeof *g);
    if (!g)
        return NULL;
    g->epfd = -1;
    g->mode = mode;
    g->size = size;
    g->depth = depth;
    g->epfd = epoll_create1(EPOLL_CLOEXEC);
    g->scratch = malloc(SCRATCH);
    g->conns = calloc((size_t)nconns, sizeof *g->conns);
    if (g->epfd < 0 || !g->scratch || !g->conns)
        goto fail;
    /* Every slot is closable by lg_close from here on, whatever fails. */
    for (int i = 0; i < nconns; i++)
        g->conns[i].fd = -1;
    g->nconns = nconns;
    for (int i = 0; i < nconns; i++) {
        conn_t *c = &g->conns[i];
        c->id = (uint32_t)i;
        c->sent_ns = calloc((size_t)depth, sizeof *c->sent_ns);
        if (!c->sent_ns)
            goto fail;
        if (mode == LG_RAW && !(c->req = malloc((size_t)size * (size_t)depth)))
            goto fail;
        c->fd = socket(ipv6 ? AF_INET6 : AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (c->fd < 0)
            goto fail;
        int one = 1;
        setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        int rc;
        /* Loopback only: the generator never targets another host. */
        if (ipv6) {
            struct sockaddr_in6 a = {0};
            a.sin6_family = AF_INET6;
            a.sin6_port = htons((uint16_t)port);
            a.sin6_addr = in6addr_loopback;
            rc = connect(c->fd, (struct sockaddr *)&a, sizeof a);
        } else {
            struct sockaddr_in a = {0};
            a.sin_family = AF_INET;
            a.sin_port = htons((uint16_t)port);
            a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
            rc = connect(c->fd, (struct sockaddr *)&a, sizeof a);
        }
        if (rc < 0 && errno != EINPROGRESS)
            goto fail;
        struct epoll_event ev = {0};
        ev.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET;
        ev.data.u32 = (uint32_t)i;
        if (epoll_ctl(g->epfd, EPOLL_CTL_ADD, c->fd, &ev) < 0)
            goto fail;
    }
    return g;
fail: {
    int e = errno;
    lg_close(g);
    errno = e;
    return NULL;
}
}

int lg_drive(lg_gen *g, double seconds, uint64_t max_msgs, double stall_seconds, int record,
             lg_result *out) {
    struct epoll_event evs[MAX_EVENTS];
    memset(&g->r, 0, sizeof g->r);
    memset(g->hist, 0, sizeof g->hist);
    g->record = record;
    uint64_t start = now_ns();
    uint64_t deadline = start + (uint64_t)(seconds * 1e9);
    uint64_t stall = (uint64_t)(stall_seconds * 1e9);
    g->last_progress = start;
    uint64_t t = start;
    /* After lg_quiesce nothing is in flight and no event will come: start
     * every idle connection again. */
    for (int i = 0; i < g->nconns; i++) {
        conn_t *c = &g->conns[i];
        if (c->connected && !c->dead && c->seq_recv == c->seq_sent && c->tx.len == 0)
            send_requests(g, c, g->depth, t);
    }
    while (t < deadline && (max_msgs == 0 || g->r.msgs < max_msgs)) {
        if (g->draining) {
            int busy = 0;
            for (int i = 0; i < g->nconns && !busy; i++)
                busy = !g->conns[i].dead && g->conns[i].connected &&
                       g->conns[i].seq_recv != g->conns[i].seq_sent;
            if (!busy)
                break;
        }
        int ms = (int)((deadline - t) / 1000000u) + 1;
        if (ms > 50)
            ms = 50; /* wake to check the stall bound */
        int n = epoll_wait(g->epfd, evs, MAX_EVENTS, ms);
        if (n < 0) {
            if (errno == EINTR) {
                t = now_ns();
                continue;
            }
            return -errno;
        }
        t = now_ns();
        for (int i = 0; i < n; i++) {
            conn_t *c = &g->conns[evs[i].data.u32];
            uint32_t ev = evs[i].events;
            if (c->dead)
                continue;
            if (!c->connected) {
                if (!(ev & (EPOLLOUT | EPOLLERR | EPOLLHUP)))
                    continue;
                conn_start(g, c, t);
                if (c->dead)
                    continue;
            } else if (ev & EPOLLOUT) {
                conn_flush(g, c);
            }
            if (!c->dead && (ev & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)))
                conn_read(g, c, ev);
        }
        t = now_ns();
        if (stall && t - g->last_progress > stall) {
            g->r.stalled = 1;
            break;
        }
        int alive = 0;
        for (int i = 0; i < g->nconns && !alive; i++)
            alive = !g->conns[i].dead;
        if (!alive)
            break;
    }
    g->r.elapsed = (double)(now_ns() - start) / 1e9;
    /* Percentiles from the histogram. */
    uint64_t total = 0;
    double sum = 0;
    int maxi = -1;
    for (int i = 0; i < LG_HIST_BUCKETS; i++) {
        total += g->hist[i];
        sum += (double)g->hist[i] * hist_value(i);
        if (g->hist[i])
            maxi = i;
    }
    if (total) {
        uint64_t p50 = (total + 1) / 2, p99 = (total * 99 + 99) / 100, acc = 0;
        int got50 = 0;
        for (int i = 0; i < LG_HIST_BUCKETS; i++) {
            acc += g->hist[i];
            if (!got50 && acc >= p50) {
                g->r.p50_us = hist_value(i) / 1e3;
                got50 = 1;
            }
            if (acc >= p99) {
                g->r.p99_us = hist_value(i) / 1e3;
                break;
            }
        }
        g->r.mean_us = sum / (double)total / 1e3;
        g->r.max_us = hist_value(maxi) / 1e3;
    }
    *out = g->r;
    return 0;
}

int lg_quiesce(lg_gen *g, double seconds, lg_result *out) {
    g->draining = 1;
    int rc = lg_drive(g, seconds, 0, seconds, 0, out);
    g->draining = 0;
    return rc;
}

void lg_close(lg_gen *g) {
    if (!g)
        return;
    for (int i = 0; i < g->nconns; i++) {
        conn_t *c = &g->conns[i];
        if (c->fd >= 0)
            close(c->fd);
        free(c->tx.p);
        free(c->rx.p);
        free(c->req);
        free(c->sent_ns);
    }
    free(g->conns);
    free(g->scratch);
    if (g->epfd >= 0)
        close(g->epfd);
    free(g);
}

/* ---- the minimal C edge-triggered server (the floor reference) ---- */

typedef struct {
    buf_t in;  /* LG_LINES / LG_HTTP: bytes after the last complete message */
    buf_t out; /* unsent output, flushed on EPOLLOUT                       */
} srv_conn;

static void srv_close(int epfd, srv_conn **conns, int fd) {
    epoll_ctl(epfd, EPOLL_CTL_DEL, fd, NULL);
    close(fd);
    if (conns[fd]) {
        free(conns[fd]->in.p);
        free(conns[fd]->out.p);
        free(conns[fd]);
        conns[fd] = NULL;
    }
}

/* One write for this read's answer; what does not fit waits for EPOLLOUT. */
static int srv_send(srv_conn *sc, int fd, const unsigned char *p, size_t n) {
    if (n == 0)
        return 0;
    if (sc->out.len > sc->out.off)
        return buf_append(&sc->out, p, n);
    ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
    if (w < 0) {
        if (errno != EAGAIN && errno != EWOULDBLOCK)
            return -1;
        w = 0;
    }
    if ((size_t)w < n)
        return buf_append(&sc->out, p + w, n - (size_t)w);
    return 0;
}

static int srv_flush(srv_conn *sc, int fd) {
    while (sc->out.off < sc->out.len) {
        ssize_t w = send(fd, sc->out.p + sc->out.off, sc->out.len - sc->out.off, MSG_NOSIGNAL);
        if (w < 0)
            return (errno == EAGAIN || errno == EWOULDBLOCK) ? 0 : -1;
        sc->out.off += (size_t)w;
    }
    sc->out.off = sc->out.len = 0;
    return 0;
}

static int srv_handle(srv_conn *sc, int fd, int mode, const unsigned char *p, size_t n,
                      buf_t *resp) {
    if (mode == LG_RAW)
        return srv_send(sc, fd, p, n);
    if (buf_append(&sc->in, p, n) < 0)
        return -1;
    const unsigned char *s = sc->in.p + sc->in.off;
    size_t avail = sc->in.len - sc->in.off;
    if (mode == LG_LINES) {
        /* Echo every complete line of this read in one write. */
        const unsigned char *last = memrchr(s, '\n', avail);
        if (last == NULL)
            return 0;
        size_t k = (size_t)(last - s) + 1;
        sc->in.off += k;
        int rc = srv_send(sc, fd, s, k);
        if (sc->in.off == sc->in.len)
            sc->in.off = sc->in.len = 0;
        return rc;
    }
    /* LG_HTTP: one response per complete request head, one write in all. */
    resp->len = resp->off = 0;
    for (;;) {
        const unsigned char *e = memmem(s, avail, "\r\n\r\n", 4);
        if (e == NULL)
            break;
        size_t k = (size_t)(e - s) + 4;
        if (buf_append(resp, HTTP_RESP, sizeof HTTP_RESP - 1) < 0)
            return -1;
        s += k;
        avail -= k;
        sc->in.off += k;
    }
    if (sc->in.off == sc->in.len)
        sc->in.off = sc->in.len = 0;
    if (avail > HTTP_MAX_HEAD)
        return -1;
    return srv_send(sc, fd, resp->p, resp->len);
}

int lg_c_server(int lfd, int mode, double seconds) {
    if (mode < LG_RAW || mode > LG_HTTP)
        return -EINVAL;
    int epfd = epoll_create1(EPOLL_CLOEXEC);
    if (epfd < 0)
        return -errno;
    int cap = 1024;
    srv_conn **conns = calloc((size_t)cap, sizeof *conns);
    unsigned char *buf = malloc(SCRATCH);
    buf_t resp = {0};
    int rc = 0;
    if (!conns || !buf) {
        rc = -ENOMEM;
        goto out;
    }
    struct epoll_event ev = {0};
    ev.events = EPOLLIN | EPOLLET;
    ev.data.fd = lfd;
    if (epoll_ctl(epfd, EPOLL_CTL_ADD, lfd, &ev) < 0) {
        rc = -errno;
        goto out;
    }
    uint64_t deadline = now_ns() + (uint64_t)(seconds * 1e9);
    struct epoll_event evs[MAX_EVENTS];
    while (now_ns() < deadline) {
        int n = epoll_wait(epfd, evs, MAX_EVENTS, 100);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            rc = -errno;
            break;
        }
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            uint32_t e = evs[i].events;
            if (fd == lfd) {
                for (;;) { /* accept until EAGAIN */
                    int cfd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
                    if (cfd < 0)
                        break;
                    if (cfd >= cap) {
                        int ncap = cap;
                        while (ncap <= cfd)
                            ncap *= 2;
                        srv_conn **nc = realloc(conns, (size_t)ncap * sizeof *conns);
                        if (!nc) {
                            close(cfd);
                            continue;
                        }
                        memset(nc + cap, 0, (size_t)(ncap - cap) * sizeof *conns);
                        conns = nc;
                        cap = ncap;
                    }
                    conns[cfd] = calloc(1, sizeof(srv_conn));
                    int one = 1;
                    setsockopt(cfd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    struct epoll_event cev = {0};
                    cev.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET;
                    cev.data.fd = cfd;
                    if (!conns[cfd] || epoll_ctl(epfd, EPOLL_CTL_ADD, cfd, &cev) < 0)
                        srv_close(epfd, conns, cfd);
                }
                continue;
            }
            srv_conn *sc = conns[fd];
            if (sc == NULL)
                continue;
            if ((e & EPOLLOUT) && srv_flush(sc, fd) < 0) {
                srv_close(epfd, conns, fd);
                continue;
            }
            if (!(e & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)))
                continue;
            /* Drain until EAGAIN, as the tutorials teach: each event ends
             * with one read that fails. */
            for (;;) {
                ssize_t r = recv(fd, buf, SCRATCH, 0);
                if (r < 0) {
                    if (errno == EINTR)
                        continue;
                    if (errno != EAGAIN && errno != EWOULDBLOCK)
                        srv_close(epfd, conns, fd);
                    break;
                }
                if (r == 0 || srv_handle(sc, fd, mode, buf, (size_t)r, &resp) < 0) {
                    srv_close(epfd, conns, fd);
                    break;
                }
            }
        }
    }
out:
    if (conns) {
        for (int fd = 0; fd < cap; fd++)
            if (conns[fd])
                srv_close(epfd, conns, fd);
    }
    free(conns);
    free(buf);
    free(resp.p);
    close(epfd);
    return rc;
}
