/* fastmux load generator and minimal C reference server (``fastmux.bench._loadgen``).
 *
 * A separate cffi module from the loop's core: the benchmark must not share
 * code with the thing it measures.  Everything between the LG_CDEF markers is
 * read by fastmux/bench/_loadgen_build.py as the cffi cdef, so keep it plain C that
 * cffi's parser understands (no macros with expressions, no includes).
 *
 * Every function here runs with the GIL released (cffi wraps each call in
 * Py_BEGIN/END_ALLOW_THREADS) and touches no Python object.
 */
#ifndef FASTMUX_LOADGEN_H
#define FASTMUX_LOADGEN_H

#include <stdint.h>

/* LG_CDEF_BEGIN */

/* Scenario modes, shared by the generator and lg_c_server. */
#define LG_RAW 0    /* echo of `size`-byte payloads, seq + pattern, `depth` in flight */
#define LG_LINES 1  /* 64 B newline-terminated lines, `depth` in flight     */
#define LG_HTTP 2   /* GET keep-alive, expects 200 and body "Hello, world!" */

#define LG_HIST_BUCKETS 2112

typedef struct lg_gen lg_gen;

typedef struct {
    uint64_t msgs;          /* responses received and verified          */
    uint64_t errors;        /* responses whose bytes did not match      */
    uint64_t conn_errors;   /* connections lost (EOF, reset, ...)       */
    uint64_t bytes_in;
    uint64_t bytes_out;
    uint64_t writes;        /* client-side send calls (for sanity)      */
    double elapsed;         /* seconds the drive call ran               */
    double p50_us;
    double p99_us;
    double max_us;
    double mean_us;
    int stalled;            /* 1: no progress for the stall timeout     */
} lg_result;

/* Open `conns` connections to 127.0.0.1:port (::1 when ipv6 != 0).
 * size: payload bytes (LG_RAW; 8..16 MiB); depth: requests in flight per
 * connection (LG_RAW, LG_LINES: 1..4096, sent in one write; LG_RAW at most
 * 64 MiB in flight; LG_HTTP: always 1).  Returns NULL with errno set on failure; the
 * connect itself completes during the first lg_drive. */
lg_gen *lg_open(int port, int ipv6, int conns, int mode, int size, int depth);

/* Drive load for at most `seconds` or until `max_msgs` responses (0: no
 * count limit), whichever comes first; stop early when no response arrives
 * for `stall_seconds`.  Latencies are recorded only when record != 0.
 * Requests still in flight at the end stay in flight: the next lg_drive
 * carries on from there.  Returns 0, or -errno on a setup failure. */
int lg_drive(lg_gen *g, double seconds, uint64_t max_msgs, double stall_seconds,
             int record, lg_result *out);

/* Send nothing new and wait (at most `seconds`) until every request in
 * flight is answered, so that a measurement window can start and end with
 * the server idle; `out->msgs` counts the answers.  The next lg_drive
 * starts every connection again.  Returns 0, or -errno. */
int lg_quiesce(lg_gen *g, double seconds, lg_result *out);

/* Close every connection and free `g`. */
void lg_close(lg_gen *g);

/* Fill `out` with the expected bytes of request `seq` on connection `conn`
 * for LG_RAW/LG_LINES (tests use it to check the generator's own format).
 * Returns the number of bytes, or -1. */
int lg_format(int mode, int size, uint32_t conn, uint64_t seq, unsigned char *out, int cap);

/* The minimal edge-triggered epoll server (the floor reference): accepts on
 * the listening fd `listen_fd`, drains every readable socket until read
 * fails with EAGAIN, and answers each read with one write: LG_RAW echoes the
 * chunk, LG_LINES echoes the complete lines, LG_HTTP sends one response per
 * complete request.  Runs until `seconds` elapse (the bound) or the process
 * is killed.  Returns 0, or -errno. */
int lg_c_server(int listen_fd, int mode, double seconds);

/* LG_CDEF_END */

#endif
