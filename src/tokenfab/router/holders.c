/* Block hash -> bitmask of the worker slots holding it: the router index's hot table.

   Open addressing with linear probing; each row is the 64-bit key followed by W 64-bit mask
   words, so a probe touches one cache line. A row is empty when all its mask words are zero
   (a hash nobody holds is not kept), which leaves every key value usable. Deletion shifts the
   following rows back instead of leaving tombstones, so lookups never slow down with churn.
   Batched operations prefetch the rows a few keys ahead: on a table far larger than the CPU's
   caches each probe is a memory miss, and overlapping them is most of the speed. */

#define _DEFAULT_SOURCE
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __linux__
#include <sys/mman.h>
#endif

#define PREFETCH_AHEAD 8

typedef struct {
    uint64_t *rows;
    int64_t cap; /* rows, a power of two */
    int64_t len; /* non-empty rows */
    int W;       /* mask words per row */
} table;

static inline uint64_t mix(uint64_t x) {
    /* splitmix64's finalizer: keys need not be random (tests use small integers). */
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ULL;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
}

static inline uint64_t *row(const table *t, int64_t i) { return t->rows + i * (1 + t->W); }

static inline int is_empty(const table *t, const uint64_t *r) {
    for (int w = 1; w <= t->W; w++)
        if (r[w]) return 0;
    return 1;
}

static inline void prefetch(const table *t, uint64_t key) {
    __builtin_prefetch(row(t, (int64_t)(mix(key) & (uint64_t)(t->cap - 1))));
}

/* Index of the key's row, or of the empty row where it would go. */
static int64_t find(const table *t, uint64_t key) {
    int64_t m = t->cap - 1;
    int64_t i = (int64_t)(mix(key) & (uint64_t)m);
    for (;;) {
        uint64_t *r = row(t, i);
        if (is_empty(t, r) || r[0] == key) return i;
        i = (i + 1) & m;
    }
}

/* Zeroed rows. Large tables go on transparent huge pages where the kernel offers them: with 4 KiB
   pages nearly every probe of a table past the TLB's reach also missed the TLB. */
static uint64_t *alloc_rows(int64_t cap, int W) {
    size_t bytes = (size_t)cap * (1 + W) * sizeof(uint64_t);
#ifdef __linux__
    if (bytes >= ((size_t)2 << 20)) {
        void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED) return NULL;
        madvise(p, bytes, MADV_HUGEPAGE);
        return p;
    }
#endif
    return calloc(bytes, 1);
}

static void free_rows(uint64_t *rows, int64_t cap, int W) {
    size_t bytes = (size_t)cap * (1 + W) * sizeof(uint64_t);
#ifdef __linux__
    if (bytes >= ((size_t)2 << 20)) {
        munmap(rows, bytes);
        return;
    }
#endif
    (void)bytes;
    free(rows);
}

static int rehash(table *t, int64_t cap, int W) {
    uint64_t *rows = alloc_rows(cap, W);
    if (!rows) return -1;
    table n = {rows, cap, t->len, W};
    for (int64_t i = 0; i < t->cap; i++) {
        uint64_t *r = row(t, i);
        if (is_empty(t, r)) continue;
        uint64_t *d = row(&n, find(&n, r[0]));
        d[0] = r[0];
        memcpy(d + 1, r + 1, sizeof(uint64_t) * t->W);
    }
    free_rows(t->rows, t->cap, t->W);
    *t = n;
    return 0;
}

static void delete_row(table *t, int64_t i) {
    int64_t m = t->cap - 1, S = 1 + t->W;
    int64_t j = i;
    for (;;) {
        j = (j + 1) & m;
        uint64_t *r = row(t, j);
        if (is_empty(t, r)) break;
        int64_t k = (int64_t)(mix(r[0]) & (uint64_t)m);
        /* The row at j may stay when its home k lies cyclically in (i, j]. */
        int stays = i <= j ? (i < k && k <= j) : (i < k || k <= j);
        if (stays) continue;
        memcpy(row(t, i), r, sizeof(uint64_t) * S);
        i = j;
    }
    memset(row(t, i), 0, sizeof(uint64_t) * S);
    t->len--;
}

table *ht_new(int W) {
    table *t = calloc(1, sizeof(table));
    if (!t) return NULL;
    t->cap = 1024;
    t->W = W;
    t->rows = alloc_rows(t->cap, W);
    if (!t->rows) {
        free(t);
        return NULL;
    }
    return t;
}

void ht_free(table *t) {
    if (!t) return;
    free_rows(t->rows, t->cap, t->W);
    free(t);
}

int64_t ht_len(const table *t) { return t->len; }

int ht_widen(table *t, int W) { return W <= t->W ? 0 : rehash(t, t->cap, W); }

/* Set the slot's bit on each key; returns how many did not have it, or -1 when out of memory. */
static int64_t store(table *t, const uint64_t *keys, int64_t n, int word, uint64_t bit) {
    int64_t added = 0;
    for (int64_t j = 0; j < n; j++) {
        if (j + PREFETCH_AHEAD < n) prefetch(t, keys[j + PREFETCH_AHEAD]);
        if ((t->len + 1) * 10 > t->cap * 7 && rehash(t, t->cap * 2, t->W)) return -1;
        uint64_t *r = row(t, find(t, keys[j]));
        if (is_empty(t, r)) {
            r[0] = keys[j];
            t->len++;
        }
        added += !(r[1 + word] & bit);
        r[1 + word] |= bit;
    }
    return added;
}

/* Clear the slot's bit on each key; returns how many had it. */
static int64_t remove_keys(table *t, const uint64_t *keys, int64_t n, int word, uint64_t bit) {
    int64_t removed = 0;
    for (int64_t j = 0; j < n; j++) {
        if (j + PREFETCH_AHEAD < n) prefetch(t, keys[j + PREFETCH_AHEAD]);
        int64_t i = find(t, keys[j]);
        uint64_t *r = row(t, i);
        if (is_empty(t, r) || !(r[1 + word] & bit)) continue;
        r[1 + word] &= ~bit;
        removed++;
        if (is_empty(t, r)) delete_row(t, i);
    }
    return removed;
}

/* Clear the slot's bit everywhere (a whole-table scan); returns how many rows had it. */
static int64_t clear_slot(table *t, int word, uint64_t bit) {
    int64_t cleared = 0;
    for (int64_t i = 0; i < t->cap; i++) {
        uint64_t *r = row(t, i);
        if (!(r[1 + word] & bit)) continue;
        r[1 + word] &= ~bit;
        cleared++;
        if (is_empty(t, r)) {
            delete_row(t, i);
            i--; /* a later row may have shifted into i */
        }
    }
    return cleared;
}

/* Apply a worker's events in order. ops[e] >= 0: store the next ops[e] keys; ops[e] < 0 and
   not INT64_MIN: remove the next ~ops[e] keys; INT64_MIN: clear the slot. Returns the change in
   the worker's block count; INT64_MIN when out of memory (the events before the failing one
   stay applied). */
int64_t ht_apply(table *t, const uint64_t *keys, const int64_t *ops, int64_t nops, int slot) {
    int word = slot / 64;
    uint64_t bit = 1ULL << (slot % 64);
    int64_t delta = 0, at = 0;
    for (int64_t e = 0; e < nops; e++) {
        int64_t op = ops[e];
        if (op >= 0) {
            int64_t added = store(t, keys + at, op, word, bit);
            if (added < 0) return INT64_MIN;
            delta += added;
            at += op;
        } else if (op != INT64_MIN) {
            delta -= remove_keys(t, keys + at, ~op, word, bit);
            at += ~op;
        } else {
            delta -= clear_slot(t, word, bit);
        }
    }
    return delta;
}

/* The key's W mask words (zeros when nobody holds it). */
void ht_get(const table *t, uint64_t key, uint64_t *out) {
    uint64_t *r = row(t, find(t, key));
    for (int w = 0; w < t->W; w++) out[w] = r[0] == key ? r[1 + w] : 0;
}

/* The longest-prefix walk of find_matches: the running AND of the keys' masks (each OR'd with
   overlay's W words for that key when overlay is not NULL). Each time workers drop out, writes
   the depth and the dropped mask; at the end, the depth n and the workers still matching.
   Returns the number of records; depths needs n + 1 entries and dropped (n + 1) * W. */
int64_t ht_walk(const table *t, const uint64_t *keys, int64_t n, const uint64_t *overlay,
                int64_t *depths, uint64_t *dropped) {
    int W = t->W;
    uint64_t cur[64], m[64];
    if (W > 64 || n <= 0) return 0;
    int64_t records = 0;
    for (int64_t d = 0; d < n; d++) {
        if (d + PREFETCH_AHEAD < n) prefetch(t, keys[d + PREFETCH_AHEAD]);
        ht_get(t, keys[d], m);
        uint64_t any = 0, changed = 0;
        for (int w = 0; w < W; w++) {
            if (overlay) m[w] |= overlay[d * W + w];
            if (d == 0) cur[w] = m[w];
            m[w] &= cur[w];
            any |= m[w];
            changed |= m[w] ^ cur[w];
        }
        if (d == 0) {
            if (!any) return 0;
            continue;
        }
        if (changed) {
            depths[records] = d;
            for (int w = 0; w < W; w++) dropped[records * W + w] = cur[w] & ~m[w];
            records++;
            if (!any) return records;
            memcpy(cur, m, sizeof(uint64_t) * W);
        }
    }
    depths[records] = n;
    memcpy(dropped + records * W, cur, sizeof(uint64_t) * W);
    return records + 1;
}
