/* Per-thread kernel scratch (scaled activation tiles, packed panels), grown on
 * demand and freed when the thread exits (pthread key destructor); the
 * panel GEMMs' weight prefetch and the decode GEMV's long-row segments,
 * which both SIMD files share; the AVX-512 panel GEMM's activation block. */
#include "kernels/kernels.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#define SLOTS 5

typedef struct tls_bufs {
    void *p[SLOTS];
    size_t cap[SLOTS];
} tls_bufs;

static pthread_key_t g_key;
static pthread_once_t g_once = PTHREAD_ONCE_INIT;

static void free_bufs(void *v) {
    tls_bufs *b = v;
    for (int i = 0; i < SLOTS; i++) free(b->p[i]);
    free(b);
}

static void make_key(void) { pthread_key_create(&g_key, free_bufs); }

void *dsi__tls_buffer(int slot, size_t bytes) {
    if (slot < 0 || slot >= SLOTS) return NULL;
    pthread_once(&g_once, make_key);
    tls_bufs *b = pthread_getspecific(g_key);
    if (!b) {
        if (!(b = calloc(1, sizeof *b))) return NULL;
        pthread_setspecific(g_key, b);
    }
    if (bytes > b->cap[slot]) {
        free(b->p[slot]);
        size_t rounded = (bytes + 63) & ~(size_t)63;
        b->p[slot] = aligned_alloc(64, rounded);
        b->cap[slot] = b->p[slot] ? rounded : 0;
    }
    return b->p[slot];
}

void dsi__prefetch_panel(const dsi_mat *W, int n, int n1, int k0, int pn, int kc) {
    int K = W->cols;
    if (k0 >= K) {
        n += pn;
        k0 = 0;
    }
    if (n >= n1) return;
    size_t es = dsi_dtype_size(W->dtype), bytes = (size_t)DSI_MIN(kc, K - k0) * es;
    for (int j = n; j < DSI_MIN(n + pn, n1); j++) {
        const char *row = (const char *)W->data + ((size_t)j * K + k0) * es;
        for (size_t off = 0; off < bytes; off += 64) __builtin_prefetch(row + off, 0, 2); /* prefetcht1 */
    }
}

void dsi__prefetch_scales(const dsi_mat *W, int n0, int n1) {
    if (n1 <= n0) return;
    const char *b = (const char *)(W->scale_inv + (size_t)(n0 / W->block_rows) * W->scale_cols),
               *e = (const char *)(W->scale_inv + (size_t)((n1 - 1) / W->block_rows + 1) * W->scale_cols);
    for (const char *c = (const char *)((uintptr_t)b & ~(uintptr_t)63); c < e; c += 64) __builtin_prefetch(c, 0, 3);
}

const float *dsi__panel_x(const float *x, int M, int ldx, int k0, int kc, int *ldb) {
    if (ldx % 512) {
        *ldb = ldx;
        return x + k0;
    }
    int ld = DSI_CEIL_DIV(kc, 16) * 16 + 16;
    float *b = dsi__tls_buffer(DSI_TLS_XBLOCK, sizeof(float) * (size_t)M * ld);
    if (!b) return NULL;
    for (int m = 0; m < M; m++) memcpy(b + (size_t)m * ld, x + (size_t)m * ldx + k0, sizeof(float) * kc);
    *ldb = ld;
    return b;
}

/* Rows longer than SEG_BYTES (K > 4096: DeepSeek-V3's hidden 7168, a dense
 * down projection's 8192 or 18432) are read in equal segments of at most
 * SEG_BYTES, segment by segment over groups of DSI_SEG_ROWS rows, each row's
 * segments summed in order. One whole long row needs 4K bytes of scaled
 * activations, which no longer fit in L1 beside the weight stream (32 KB for
 * K = 8192: every activation load went to L2); a segment's 16 KB stay in L1
 * while DSI_SEG_ROWS rows use them. The segments take no near prefetch:
 * with it, the segmented GEMV streamed 16-17 GB/s, without it 25 (AVX-512 on
 * Zen 4, one core, rows from memory: K = 8192 13 -> 25 GB/s, K = 7168
 * 18 -> 25, K = 16384 12 -> 22; K <= 4096 stays whole, 28-29).
 * The far prefetch does not follow the segment order, which hops between
 * rows K bytes apart: it runs through memory in address order, one line per
 * line computed, so memory sees a single forward stream and the group's
 * segments are read from L2 in any order (aimed at the segment read 4
 * segments later instead, the GEMV streamed 69-74% of a plain read;
 * bench_gemv, K = 7168 and 8192). Its lead (dsi__gemv_seg_ahead): the first
 * segment pass touches the whole group's address range (G bytes) while
 * consuming G / nseg of it, so its last rows are needed G (1 - 1 / nseg)
 * bytes of stream after the pass began; the pointer starts that far ahead
 * plus the usual 8 KB of latency cover. It used to start half a group ahead
 * (G / 2: enough address for nseg = 2 but no latency cover there, and short
 * for nseg = 4): against that, one process alternating (AVX-512, Zen 4),
 * K = 16384 (V3's o_proj) 20.1 -> 23.0 and 20.2 -> 22.7 GB/s, K = 7168 and
 * 8192 +0.5 to +3% in four comparisons. (A whole group ahead had measured
 * 71-77% of a read against half a group's 76-81%, a quarter 52-54%.) */
#define SEG_BYTES 4096
#define SEG_LATENCY_BYTES 8192

size_t dsi__gemv_seg_ahead(int K, int seg, int g) {
    size_t G = (size_t)g * K, nseg = (size_t)DSI_CEIL_DIV(K, seg);
    return G - G / nseg + SEG_LATENCY_BYTES;
}

int dsi__gemv_seg_bytes(int K) {
    int nseg = DSI_CEIL_DIV(K, SEG_BYTES);
    return DSI_CEIL_DIV(DSI_CEIL_DIV(K, nseg), 64) * 64;
}

void dsi__gemv_rows(const uint8_t *w, int K, int seg, int g, const float *xs, const uint8_t *last, float *out,
                    dsi_gemv_row_fn row, dsi_gemv_seg_fn segment) {
    if (seg >= K) {
        for (int r = 0; r < g; r++) out[r] = row(w + (size_t)r * K, (size_t)K, xs, last);
        return;
    }
    for (int r = 0; r < g; r++) out[r] = 0;
    const uint8_t *ahead = w + dsi__gemv_seg_ahead(K, seg, g);
    size_t i = 0; /* segment * g + row: the far prefetch's step count */
    for (int k0 = 0; k0 < K; k0 += seg) {
        size_t n = (size_t)DSI_MIN(seg, K - k0);
        for (int r = 0; r < g; r++, i++) out[r] += segment(w + (size_t)r * K + k0, n, xs + k0, ahead + i * seg, last);
    }
}
