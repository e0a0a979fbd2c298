/*
 * fuzz_framing.c -- libFuzzer target for the C framers (csrc/framing.c).
 *
 * Built by .ci/fuzz.sh with clang -fsanitize=fuzzer,address,undefined.
 * framing.c is compiled into this harness (#include) so that the internal,
 * stateful splitter fm__split() -- the one the core calls with a `scan`
 * carried from read to read -- is exercised as well as the public
 * fm_split().  For every input:
 *
 *  1. fm_split() on the whole buffer, with a random maxout: invariants
 *     (count <= maxout, start <= end <= consumed <= len, messages in order
 *     and non-overlapping, consumed at a message boundary, payload sizes
 *     within max_size, toolarge only when fewer than maxout were found) and
 *     equality with a naive reference framer written from the spec.
 *  2. The same bytes fed in random chunks to fm__split() the way the core
 *     does (keep the unconsumed tail, carry `scan`, call again while a call
 *     filled maxout): the messages, the consumed total and the toolarge
 *     verdict must equal the one-shot reference.
 *
 * Input layout: [kind][max selector][n / seplen][flags][seed][sep bytes][data]
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../../csrc/framing.c"

/* framing.c's fm__frame() needs these; the harness never calls fm__frame. */
int fm__emit(fm_loop *loop, int kind, int id, uint32_t start, uint32_t end)
{
    (void)loop; (void)kind; (void)id; (void)start; (void)end;
    abort();
}
char *fm__arena_reserve(fm_loop *loop, size_t n)
{
    (void)loop; (void)n;
    abort();
}

#define CHECK(c) do { if (!(c)) { fprintf(stderr, "fuzz_framing: check failed at line %d: %s\n", __LINE__, #c); abort(); } } while (0)
#define MAXMSG 65536

static uint32_t rng_state;
static uint32_t rnd(void)
{
    rng_state = rng_state * 1103515245u + 12345u;
    return rng_state >> 8;
}

typedef struct { uint32_t s, e; } span;

/* The spec, naively: complete messages in order until an incomplete tail or
 * an oversized message. */
static int reference(const fm_framing *f, const unsigned char *buf, size_t len,
                     span *out, int maxout, size_t *consumed, int *toolarge)
{
    size_t pos = 0;
    int k = 0;
    *toolarge = 0;
    if (f->kind == FM_FR_RAW) {
        if (len > 0 && maxout > 0) {
            out[0].s = 0; out[0].e = (uint32_t)len;
            pos = len; k = 1;
        }
    } else if (f->kind == FM_FR_DELIM) {
        while (k < maxout) {
            size_t at, found = 0;
            for (at = pos; at + f->seplen <= len; at++) {
                if (memcmp(buf + at, f->sep, f->seplen) == 0) { found = 1; break; }
            }
            if (!found) {
                /* No separator: oversized once the payload is certain to
                 * exceed max (more than max + seplen - 1 bytes pending). */
                if ((uint64_t)(len - pos) > f->max + f->seplen - 1)
                    *toolarge = 1;
                break;
            }
            if ((uint64_t)(at - pos) > f->max) { *toolarge = 1; break; }
            out[k].s = (uint32_t)pos; out[k].e = (uint32_t)at; k++;
            pos = at + f->seplen;
        }
    } else if (f->kind == FM_FR_LENGTH) {
        while (k < maxout && len - pos >= f->n) {
            uint64_t m = 0;
            uint32_t i;
            for (i = 0; i < f->n; i++) {
                unsigned b = f->little ? buf[pos + f->n - 1 - i] : buf[pos + i];
                m = (m << 8) | b;
            }
            if (m > f->max) { *toolarge = 1; break; }
            if ((uint64_t)(len - pos - f->n) < m) break;
            out[k].s = (uint32_t)(pos + f->n); out[k].e = (uint32_t)(pos + f->n + m); k++;
            pos += f->n + m;
        }
    } else { /* FIXED */
        while (k < maxout && len - pos >= f->n) {
            out[k].s = (uint32_t)pos; out[k].e = (uint32_t)(pos + f->n); k++;
            pos += f->n;
        }
    }
    *consumed = pos;
    return k;
}

static uint32_t starts[MAXMSG + 1], ends[MAXMSG + 1];
static span ref[MAXMSG + 1];

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static const uint64_t maxes[] = {1, 2, 3, 4, 7, 8, 16, 100, 255, 256, 1000, 65535,
                                     65536, 1 << 20, 0x7fffffff};
    static const uint32_t lens[] = {1, 2, 4, 8};
    fm_framing f;
    size_t seplen = 0, hdr = 5, consumed, rconsumed, len;
    const unsigned char *buf;
    int k, rk, toolarge, rtoolarge, maxout, i;

    if (size < hdr)
        return 0;
    memset(&f, 0, sizeof f);
    f.kind = data[0] % 4;
    f.max = maxes[data[1] % (sizeof maxes / sizeof maxes[0])];
    f.little = data[3] & 1;
    rng_state = data[4] | ((uint32_t)data[3] << 8);
    if (f.kind == FM_FR_DELIM) {
        seplen = 1 + data[2] % 4;
        if (size < hdr + seplen)
            return 0;
        memcpy(f.sep, data + hdr, seplen);
        f.seplen = seplen;
        hdr += seplen;
    } else if (f.kind == FM_FR_LENGTH) {
        f.n = lens[data[2] % 4];
    } else if (f.kind == FM_FR_FIXED) {
        f.n = 1 + data[2] % 16;
    }
    buf = data + hdr;
    len = size - hdr;
    if (len > MAXMSG)
        return 0;

    /* 1. public fm_split: invariants + reference. */
    maxout = (data[3] & 2) ? (int)(len + 1) : (int)(1 + rnd() % 8);
    k = fm_split(f.kind, f.max, f.n, f.sep, f.seplen, f.little, (const char *)buf, len,
                 starts, ends, maxout, &consumed, &toolarge);
    CHECK(k >= 0 && k <= maxout);
    CHECK(consumed <= len);
    for (i = 0; i < k; i++) {
        CHECK(starts[i] <= ends[i]);
        CHECK(ends[i] <= consumed);
        if (i > 0)
            CHECK(starts[i] >= ends[i - 1]);
        if (f.kind == FM_FR_DELIM || f.kind == FM_FR_LENGTH)
            CHECK(ends[i] - starts[i] <= f.max);
        if (f.kind == FM_FR_DELIM)
            CHECK(memcmp(buf + ends[i], f.sep, seplen) == 0);
    }
    if (k > 0)
        CHECK(consumed == ends[k - 1] + (f.kind == FM_FR_DELIM ? seplen : 0));
    else
        CHECK(consumed == 0);
    if (toolarge)
        CHECK(k < maxout);
    rk = reference(&f, buf, len, ref, maxout, &rconsumed, &rtoolarge);
    CHECK(rk == k && rconsumed == consumed && rtoolarge == toolarge);
    for (i = 0; i < k; i++)
        CHECK(ref[i].s == starts[i] && ref[i].e == ends[i]);

    /* 2. stateful, chunked, the way the core reads: compare to one shot
     * (RAW messages are whatever each read brought: only consumption). */
    rk = reference(&f, buf, len, ref, MAXMSG + 1, &rconsumed, &rtoolarge);
    {
        size_t fed = 0, base = 0, scan = 0, total = 0;
        int got = 0, tl = 0;
        while (fed < len && !tl) {
            size_t chunk = 1 + rnd() % (rnd() % 4 == 0 ? 64 : 8);
            if (chunk > len - fed)
                chunk = len - fed;
            fed += chunk;
            for (;;) {
                int mo = 1 + (int)(rnd() % 5), j;
                size_t c2;
                int t2;
                j = fm__split(&f, (const char *)buf + base, fed - base, &scan, starts, ends,
                              mo, &c2, &t2);
                CHECK(j >= 0 && j <= mo && c2 <= fed - base);
                for (i = 0; i < j && f.kind != FM_FR_RAW; i++) {
                    CHECK(got < rk);
                    CHECK(ref[got].s == base + starts[i] && ref[got].e == base + ends[i]);
                    got++;
                }
                base += c2;
                total += c2;
                if (f.kind == FM_FR_RAW)
                    scan = 0;
                if (t2) { tl = 1; break; }
                if (j < mo) break;
                /* the core resets scan after a full chunk (k == maxout) */
            }
        }
        if (f.kind != FM_FR_RAW) {
            CHECK(got == rk);
            CHECK(tl == rtoolarge);
            CHECK(total == rconsumed);
        }
    }
    return 0;
}
