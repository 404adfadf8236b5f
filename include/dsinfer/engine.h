/* dsinfer/engine.h - the step executor: one forward pass over a batch.
 *
 * A batch is a list of sequences, each bringing the tokens to process this
 * step (a prefill chunk or one decode token), the position of the first one,
 * and its block table in the KV pool (covering every position up to the last
 * new token; KV of earlier positions must already be there). Sequences of
 * different kinds mix freely in one step: continuous batching relies on it.
 *
 *     dsi_engine *e;
 *     dsi_engine_create(model, kv_pool, NULL, &e);
 *     dsi_seq_step s = {.tokens = ids, .n_tokens = n, .pos = 0,
 *                       .blocks = table, .n_blocks = nb,
 *                       .logits = DSI_LOGITS_LAST, .out_logits = buf};
 *     if (dsi_engine_step(e, &s, 1) != DSI_OK) ...
 *
 * The model and pool are borrowed and must outlive the engine. One step at a
 * time per engine (the caller serialises). */
#ifndef DSINFER_ENGINE_H
#define DSINFER_ENGINE_H

#include "dsinfer/kv.h"
#include "dsinfer/model.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum dsi_attn_mode {
    DSI_ATTN_AUTO = 0,   /* absorbed for short steps (decode), decompressed for long ones */
    DSI_ATTN_PREFILL,    /* K/V decompressed per head from the latent cache */
    DSI_ATTN_ABSORBED,   /* kv_b absorbed into q and output: attention over the latent */
} dsi_attn_mode;

/* Precision of a routed expert's input and output as they travel between
 * ranks under expert parallelism (ep.h). A single process can reproduce it,
 * so that one process and an EP group compute the same numbers: the input
 * row is rounded as it would be dispatched, each expert's output to BF16 as
 * it would be combined (FP8 and BF16 modes), and the weighted sum is taken
 * in float32 at the token's home. EXACT (default) rounds nothing. */
typedef enum dsi_moe_io {
    DSI_MOE_IO_EXACT = 0,
    DSI_MOE_IO_BF16,     /* input BF16, output BF16 */
    DSI_MOE_IO_FP8,      /* input e4m3 with one float scale per 128 channels, output BF16 */
} dsi_moe_io;

typedef struct dsi_engine_opts {
    int n_threads;          /* compute threads; 0 = all online CPUs */
    int max_tokens;         /* most tokens in one step (scratch size); 0 = 2048 */
    dsi_attn_mode attn;
    int absorb_max_tokens;  /* AUTO: absorbed when a sequence brings <= this many tokens; 0 = 32 */
    int fp8_activations;    /* quantise activations to e4m3 per 1x128 tile before FP8 matmuls */
    const char *kernels;    /* "ref", "avx2", "avx512"; NULL = best for this CPU */
    dsi_moe_io moe_io;      /* routed experts' I/O rounding in this process (see above) */
    int batch_invariant;    /* every token's numbers independent of what else is in its batch (and of
                             * how a batch is split: EP micro-batches): one matmul tile shape for every
                             * M, no packed panels, no M = 1 GEMV. Deterministic; slower prefill. */
} dsi_engine_opts;

enum { DSI_LOGITS_NONE = 0, DSI_LOGITS_LAST = 1, DSI_LOGITS_ALL = 2 };

typedef struct dsi_seq_step {
    const int32_t *tokens;  /* [n_tokens] in */
    int n_tokens;
    int pos;                /* position of tokens[0] */
    const int32_t *blocks;  /* block table, in; covers [0, pos + n_tokens) */
    int n_blocks;
    int logits;             /* DSI_LOGITS_* */
    float *out_logits;      /* out: [1 or n_tokens][vocab], caller-owned */
} dsi_seq_step;

typedef struct dsi_engine dsi_engine;

int dsi_engine_create(const dsi_model *m, dsi_kv_pool *kv, const dsi_engine_opts *opts, dsi_engine **out);
void dsi_engine_destroy(dsi_engine *e);
int dsi_engine_step(dsi_engine *e, const dsi_seq_step *seqs, int n_seqs);
int dsi_engine_max_tokens(const dsi_engine *e);
const dsi_model *dsi_engine_model(const dsi_engine *e);
dsi_kv_pool *dsi_engine_kv(const dsi_engine *e);
const char *dsi_engine_kernels_name(const dsi_engine *e);
int dsi_engine_n_threads(const dsi_engine *e);

/* Residual stream after the embedding and after each layer (the last after
 * the final norm) for the last step, when enabled: [n_layers+1][T][hidden].
 * For debugging against the oracle's hidden states. */
void dsi_engine_capture_hidden(dsi_engine *e, float *buf, int max_tokens);

/* Convenience: runs one sequence from scratch through a temporary block
 * table: prefill in chunks of `chunk` tokens (0 = all at once), then feeds the
 * tokens from `decode_from` on (if >= 0) one at a time. Writes logits for
 * every position to out [n][vocab]. Frees its blocks before returning. */
int dsi_engine_logits(dsi_engine *e, const int32_t *ids, int n, int chunk, int decode_from, float *out);

#ifdef __cplusplus
}
#endif
#endif
