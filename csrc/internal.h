/*
 * internal.h -- what the C files of the core share with each other.
 * Nothing here is visible to Python; fastmux.h is the ABI.
 */
#ifndef FASTMUX_INTERNAL_H
#define FASTMUX_INTERNAL_H

#include <stdint.h>
#include <stddef.h>
#include <sys/epoll.h>

#include "fastmux.h"

#define FM_READ_CHUNK (256 * 1024)      /* bytes asked for by one recv        */
#define FM_READ_BUDGET (256 * 1024)     /* bytes per connection per poll      */
#define FM_ACCEPT_BUDGET 128            /* accepts per listener per poll      */
#define FM_BATCH_MAX 4096               /* events per batch (soft limit)      */
#define FM_BATCH_SLACK 1024             /* room kept for CLOSED/EOF events    */
#define FM_MAX_EVENTS 1024              /* epoll_wait maxevents               */
#define FM_ARENA_INIT (1024 * 1024)     /* arena size; grows for big messages */
#define FM_ARENA_SOFT (4 * 1024 * 1024) /* a batch stops taking reads past it */
#define FM_IO_MAX 0x7ffff000u           /* largest count one syscall takes    */
#define FM_DEFAULT_HIGH (64 * 1024)     /* write queue high watermark         */
#define FM_DEFAULT_LOW (16 * 1024)      /* write queue low watermark          */
#define FM_DISCARD_MAX (1024 * 1024)    /* input discarded before a close     */
#define FM_EMFILE_BACKOFF_MS 100        /* accept pause when out of fds       */
#define FM_MAX_FRAMINGS 4096            /* framing specs per loop             */
#define FM_MAX_IDLE_LISTS 16            /* distinct idle_timeout values       */
#define FM_SEND_NOW (16 * 1024)         /* fm_queue sends writes this big now */

/* Tags in the type byte of epoll_data.u64: gen << 32 | type << 24 | slot. */
enum { FM_T_CONN = 1, FM_T_LISTENER = 2, FM_T_WATCH = 3, FM_T_WAKE = 4, FM_T_TIMER = 5 };
#define FM_SLOT_MASK 0xffffffu

/* Connection flags. */
#define FM_C_CONNECTING  0x0001u  /* non-blocking connect in progress       */
#define FM_C_PAUSED      0x0002u  /* Python paused reading                  */
#define FM_C_RDEOF       0x0004u  /* peer FIN read: no more input           */
#define FM_C_EOF_SENT    0x0008u  /* FM_EV_EOF emitted                      */
#define FM_C_CLOSING     0x0010u  /* close(): flush, then close             */
#define FM_C_SHUT_WANTED 0x0020u  /* shutdown(): SHUT_WR after the flush    */
#define FM_C_SHUT_DONE   0x0040u  /* SHUT_WR done                           */
#define FM_C_DEAD        0x0080u  /* fd closed; CLOSED pending or emitted   */
#define FM_C_REFRAME     0x0100u  /* buffered input must be framed again    */
#define FM_C_WANT_DRAIN  0x0200u  /* queue exceeded high: DRAIN at low      */
#define FM_C_READY       0x0400u  /* on the ready list                      */
#define FM_C_RDHUP       0x0800u  /* the kernel said FIN is queued          */
#define FM_C_IDLE_LINKED 0x1000u  /* on an idle list                        */
#define FM_C_DRAIN_DUE   0x2000u  /* emit DRAIN from the ready list          */
#define FM_C_DIRTY       0x4000u  /* fm_queue'd output awaits fm_flush       */

typedef struct fm_buf {
    char *p;
    size_t off;   /* first live byte */
    size_t len;   /* live bytes from off */
    size_t cap;
} fm_buf;

typedef struct fm_framing {
    int kind;
    uint32_t n;          /* LENGTH: header bytes; FIXED: message bytes */
    uint64_t max;        /* payload bound (DELIM, LENGTH)              */
    int little;
    size_t seplen;
    char sep[256];
} fm_framing;

typedef struct fm_conn fm_conn;
typedef struct fm_idle_list fm_idle_list;

struct fm_conn {
    int fd;
    int slot;
    uint32_t gen;
    uint32_t flags;
    int framing;
    int lid;                 /* listener that accepted it, or -1 */
    fm_buf in;               /* unframed input (only when non-empty)  */
    size_t scan;             /* DELIM: bytes of `in` known separator-free */
    fm_buf out;              /* unsent output                          */
    uint64_t high, low, max_wbuf;
    int close_errno, close_reason;
    fm_conn *ready_next;     /* ready list, or dying/zombie list */
    /* idle timeout: an LRU list per distinct timeout value */
    fm_idle_list *idle;
    fm_conn *idle_prev, *idle_next;
    int64_t last_in_ms;
    uint64_t msg_poll;       /* stats.polls when it last framed a message */
};

struct fm_idle_list {
    int64_t timeout_ms;      /* 0: slot unused */
    fm_conn *head, *tail;    /* least recently active first */
};

typedef struct fm_listener {
    int fd;
    int framing;
    int active;
    uint32_t gen;
    int ready;               /* accept budget spent: on the ready list */
    int64_t backoff_until;   /* EMFILE with no reserve fd: retry then  */
    int64_t max_conns;       /* < 0: unlimited */
    int64_t nconns;
    uint64_t max_wbuf;
    int64_t idle_ms;
} fm_listener;

typedef struct fm_watch {
    int fd;
    int active;
    int events;              /* FM_WATCH_* */
    uint32_t gen;
} fm_watch;

struct fm_loop {
    int epfd, wakefd, timerfd, reserve_fd;
    int hosted;              /* fm_loop_fd() was called: keep the fd honest */
    int forked;
    int wake_pending;        /* only the first fm_wakeup() writes          */
    int in_poll;             /* inside fm_poll: no need to wake a host     */
    int iterating;           /* between fm_poll and fm_flush(loop, 1)      */

    fm_batch batch;
    size_t arena_cap;
    uint32_t cap;            /* allocated batch entries */
    char *scratch;           /* one recv buffer per loop */

    fm_conn **conns;         /* by slot; NULL: free */
    uint32_t *conn_gens;     /* generation per slot, survives reuse */
    int nconns_cap;
    int *free_slots;
    int nfree;
    int conns_hwm;           /* slots ever used */

    fm_listener *listeners;
    int nlisteners;
    fm_watch *watches;
    int nwatches;

    fm_framing *framings;
    int nframings;

    int *dirty;              /* slots with FM_C_DIRTY set (maybe stale)    */
    int ndirty, dirty_cap;

    fm_conn *ready_head, *ready_tail;
    fm_conn *dying;          /* dead, CLOSED not yet emitted */
    fm_conn *zombies;        /* CLOSED emitted; freed at the next poll */
    int listeners_ready;     /* some listener has ready or backoff set */

    fm_idle_list idle[FM_MAX_IDLE_LISTS];

    fm_stats stats;
    struct epoll_event events[FM_MAX_EVENTS];
};

/* loop.c */
int64_t fm__now_ms(void);
int fm__emit(fm_loop *loop, int kind, int id, uint32_t start, uint32_t end);
int fm__batch_full(fm_loop *loop);
char *fm__arena_reserve(fm_loop *loop, size_t n);
void fm__ready_push(fm_loop *loop, fm_conn *c);
void fm__owe_poll(fm_loop *loop);
uint64_t fm__tag(int type, uint32_t gen, int slot);
fm_conn *fm__conn_get(fm_loop *loop, int cid);

/* stream.c */
fm_conn *fm__conn_new(fm_loop *loop, int fd, int framing, int connecting);
void fm__conn_io(fm_loop *loop, fm_conn *c, uint32_t ev);
void fm__conn_process(fm_loop *loop, fm_conn *c);
void fm__conn_kill(fm_loop *loop, fm_conn *c, int err, int reason);
void fm__conn_free(fm_loop *loop, fm_conn *c);
void fm__idle_touch(fm_loop *loop, fm_conn *c);
void fm__idle_set(fm_loop *loop, fm_conn *c, int64_t timeout_ms);
int64_t fm__idle_sweep(fm_loop *loop, int64_t now);
int fm__buf_reserve(fm_buf *b, size_t extra);
void fm__buf_free(fm_buf *b);

/* framing.c */
enum { FM_FRAME_OK = 0, FM_FRAME_STOP = 1, FM_FRAME_TOOLARGE = 2 };
int fm__frame(fm_loop *loop, fm_conn *c, const char *buf, size_t len,
              size_t *scan, size_t *consumed);

/* listen.c */
void fm__listener_io(fm_loop *loop, int lid);
int64_t fm__listeners_run(fm_loop *loop, int64_t now);

#endif
