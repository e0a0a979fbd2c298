/*
 * framing.c -- splitting a byte stream into messages.
 *
 * fm__split() is a pure function over bytes, the C twin of
 * fastmux/_framing.py:split_until_error(); tests compare the two on random
 * input and random chunking, and fuzz/ drives it under libFuzzer.  It never
 * allocates and never reads past buf[len).
 *
 * Oversize input is refused as early as it is certain: a length header
 * announcing more than max, or more than max + seplen - 1 bytes with no
 * separator (so the payload must be longer than max).  The caller keeps at
 * most that many unframed bytes per connection, which is what bounds memory
 * against a peer sending an endless line.
 */
#define _GNU_SOURCE
#include <string.h>

#include "internal.h"

static uint64_t fm__header(const unsigned char *p, uint32_t n, int little)
{
    uint64_t v = 0;
    uint32_t i;
    if (little) {
        for (i = n; i > 0; i--)
            v = (v << 8) | p[i - 1];
    } else {
        for (i = 0; i < n; i++)
            v = (v << 8) | p[i];
    }
    return v;
}

/* The splitters below find up to maxout messages in buf[0,len), store
 * their [start, end) offsets, set *consumed past the last one and return
 * how many they found; *toolarge is set at an oversized message. */

static int fm__split_raw(size_t len, uint32_t *starts, uint32_t *ends, int maxout,
                         size_t *consumed)
{
    if (len == 0 || maxout <= 0)
        return 0;
    starts[0] = 0;
    ends[0] = (uint32_t)len;
    *consumed = len;
    return 1;
}

/* *scan carries how many bytes from the start are known to hold no
 * separator, so a message arriving in many reads is scanned once. */
static int fm__split_delim(const fm_framing *f, const char *buf, size_t len,
                           size_t *scan, uint32_t *starts, uint32_t *ends,
                           int maxout, size_t *consumed, int *toolarge)
{
    size_t pos = 0;
    size_t from = *scan;
    int k = 0;

    while (k < maxout) {
        const char *hit;
        if (from < pos)
            from = pos;
        if (f->seplen == 1)
            hit = memchr(buf + from, f->sep[0], len - from);
        else
            hit = memmem(buf + from, len - from, f->sep, f->seplen);
        if (hit == NULL) {
            /* Bytes that cannot start a separator are known clean. */
            size_t clean = len >= f->seplen - 1 ? len - (f->seplen - 1) : 0;
            *scan = clean > pos ? clean - pos : 0;
            /* Written so that max near UINT64_MAX cannot wrap. */
            if (len - pos > f->max && len - pos - f->max > f->seplen - 1)
                *toolarge = 1;
            break;
        }
        size_t at = (size_t)(hit - buf);
        if (at - pos > f->max) {
            *toolarge = 1;
            break;
        }
        starts[k] = (uint32_t)pos;
        ends[k] = (uint32_t)at;
        k++;
        pos = at + f->seplen;
        from = pos;
        *scan = 0;
    }
    if (k == maxout)
        *scan = 0;
    *consumed = pos;
    return k;
}

static int fm__split_length(const fm_framing *f, const char *buf, size_t len,
                            uint32_t *starts, uint32_t *ends, int maxout,
                            size_t *consumed, int *toolarge)
{
    size_t pos = 0;
    int k = 0;

    while (k < maxout && len - pos >= f->n) {
        uint64_t m = fm__header((const unsigned char *)buf + pos, f->n, f->little);
        if (m > f->max) {
            *toolarge = 1;
            break;
        }
        if (len - pos - f->n < m)
            break;
        starts[k] = (uint32_t)(pos + f->n);
        ends[k] = (uint32_t)(pos + f->n + m);
        k++;
        pos += f->n + m;
    }
    *consumed = pos;
    return k;
}

static int fm__split_fixed(const fm_framing *f, size_t len, uint32_t *starts,
                           uint32_t *ends, int maxout, size_t *consumed)
{
    size_t pos = 0;
    int k = 0;

    while (k < maxout && len - pos >= f->n) {
        starts[k] = (uint32_t)pos;
        ends[k] = (uint32_t)(pos + f->n);
        k++;
        pos += f->n;
    }
    *consumed = pos;
    return k;
}

/* Find up to maxout messages; see fm_split() in fastmux.h.  *scan is used
 * by DELIM only (see fm__split_delim). */
static int fm__split(const fm_framing *f, const char *buf, size_t len,
                     size_t *scan, uint32_t *starts, uint32_t *ends,
                     int maxout, size_t *consumed, int *toolarge)
{
    *toolarge = 0;
    *consumed = 0;
    switch (f->kind) {
    case FM_FR_RAW:
        return fm__split_raw(len, starts, ends, maxout, consumed);
    case FM_FR_DELIM:
        return fm__split_delim(f, buf, len, scan, starts, ends, maxout, consumed, toolarge);
    case FM_FR_LENGTH:
        return fm__split_length(f, buf, len, starts, ends, maxout, consumed, toolarge);
    case FM_FR_FIXED:
        return fm__split_fixed(f, len, starts, ends, maxout, consumed);
    }
    return 0;
}

int fm_split(int kind, uint64_t max_size, uint32_t n, const char *sep,
             size_t seplen, int little_endian, const char *buf, size_t len,
             uint32_t *starts, uint32_t *ends, int maxout, size_t *consumed,
             int *toolarge)
{
    fm_framing f;
    size_t scan = 0;

    memset(&f, 0, sizeof f);
    if (kind < FM_FR_RAW || kind > FM_FR_FIXED || seplen > sizeof f.sep)
        return -1;
    if ((kind == FM_FR_DELIM && seplen == 0) ||
        (kind == FM_FR_LENGTH && n != 1 && n != 2 && n != 4 && n != 8) ||
        (kind == FM_FR_FIXED && n == 0))
        return -1;
    f.kind = kind;
    f.max = max_size;
    f.n = n;
    f.little = little_endian;
    f.seplen = seplen;
    if (seplen)
        memcpy(f.sep, sep, seplen);
    return fm__split(&f, buf, len, &scan, starts, ends, maxout, consumed, toolarge);
}

/* Frame buf[0,len) for connection c: each complete message is copied into
 * the arena and emitted.  Stops when the batch is full (FM_FRAME_STOP) or at
 * an oversized message (FM_FRAME_TOOLARGE); *consumed says how far it got. */
int fm__frame(fm_loop *loop, fm_conn *c, const char *buf, size_t len,
              size_t *scan, size_t *consumed)
{
    enum { CHUNK = 256 };
    uint32_t starts[CHUNK], ends[CHUNK];
    const fm_framing *f = &loop->framings[c->framing];
    size_t done = 0;

    for (;;) {
        int room = (int)(FM_BATCH_MAX - loop->batch.n);
        size_t got, total = 0;
        int toolarge, k, i;
        char *dst;

        if (room <= 0) {
            *consumed = done;
            return FM_FRAME_STOP;
        }
        if (room > CHUNK)
            room = CHUNK;
        k = fm__split(f, buf + done, len - done, scan, starts, ends, room,
                      &got, &toolarge);
        for (i = 0; i < k; i++)
            total += ends[i] - starts[i];
        dst = fm__arena_reserve(loop, total);
        if (dst == NULL) {
            /* Out of memory: treat like a full batch, retry next poll. */
            *consumed = done;
            return FM_FRAME_STOP;
        }
        for (i = 0; i < k; i++) {
            size_t m = ends[i] - starts[i];
            size_t at = loop->batch.used;
            memcpy(loop->batch.arena + at, buf + done + starts[i], m);
            loop->batch.used += m;
            fm__emit(loop, FM_EV_MSG, c->slot, (uint32_t)at, (uint32_t)(at + m));
        }
        loop->stats.messages_in += (uint64_t)k;
        if (k > 0)
            c->msg_poll = loop->stats.polls;
        done += got;
        if (toolarge) {
            *consumed = done;
            /* Messages of this connection are in this batch and Python has
             * not seen them: a handler may switch the framing on one (the
             * HTTP header, then Fixed(content_length)), and the bytes after
             * it must then be split the new way, not judged by the old
             * max_size.  So the verdict waits: STOP keeps the rest buffered
             * for the next poll, which re-frames it with whatever framing is
             * in force then and refuses it only if it is still too large. */
            if (c->msg_poll == loop->stats.polls)
                return FM_FRAME_STOP;
            return FM_FRAME_TOOLARGE;
        }
        if (k < room) {
            *consumed = done;
            return FM_FRAME_OK;
        }
    }
}
