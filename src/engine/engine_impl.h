/* Engine internals shared by the stage files (engine.c, attention.c, moe.c). */
#ifndef DSI_ENGINE_IMPL_H
#define DSI_ENGINE_IMPL_H

#include "core/threadpool.h"
#include "dsinfer/engine.h"
#include "kernels/kernels.h"
#include "model/model_impl.h"

/* Heads that share one pass over the latent KV cache in absorbed attention. */
#define ATTN_HEAD_GROUP 8

/* One sequence of the current step, as the stages see it. */
typedef struct dsi_step_seq {
    int t0, n;              /* its tokens are rows [t0, t0+n) of the step's matrices */
    int pos;                /* position of its first new token */
    const int32_t *blocks;
    int absorbed;           /* attention form for this sequence */
} dsi_step_seq;

/* Per-step scratch, sized once for max_tokens (T). Shapes in comments. */
typedef struct dsi_scratch {
    float *x;        /* [T][hidden]   residual stream */
    float *xn;       /* [T][hidden]   normalised input of the current block */
    float *qa;       /* [T][q_lora] */
    float *q;        /* [T][H][nope+rope] */
    float *kva;      /* [T][kv_lora+rope] */
    float *attn;     /* [T][H][v] */
    float *y;        /* [T][hidden]   FFN output accumulator */
    float *h1, *h2;  /* [T][max(inter, n_shared*moe_inter, moe_inter*topk)] */
    float *xq;       /* [T][max_in]   FP8-quantised activation copy, or padded rows (dsi__pad_rows) */
    size_t xq_floats;/* its capacity */
    int *topk_ids;   /* [T][topk] */
    float *topk_w;   /* [T][topk] */
    int *exp_count, *exp_offset, *exp_tokens; /* [E], [E+1], [T*topk] */
    int *tok_slot;   /* [T][topk] the slot of each (token, choice) */
    float *exp_wts;  /* [T*topk] */
    float *ex;       /* [T*topk][hidden] gathered expert inputs / outputs */
    float *eh1, *eh2;/* [T*topk][moe_inter] */
    int *tok_pos;    /* [T] position of each row */
    float *rope_cs;  /* [T][rope] each row's rotation: cos x mscale [rope/2], then sin x mscale */
    /* attention, per thread */
    float **th_scores; /* [threads][ATTN_HEAD_GROUP][max_ctx] attention probabilities */
    float **th_vec;    /* [threads][2][ATTN_HEAD_GROUP][kv_lora] absorbed q, latent output */
    /* prefill-form attention */
    float *kvdec;    /* [chunk][H][nope+v] */
    float *ostate;   /* [T][H][v+2] online-softmax state */
    float *router;   /* [T][E] router logits */
} dsi_scratch;

struct dsi_engine {
    const dsi_model *m;
    const dsi_config *c;
    dsi_kv_pool *kv;
    const dsi_kernels *k;
    dsi_pool *pool;
    dsi_engine_opts opts;
    int max_tokens;
    int max_ctx;            /* pool capacity in tokens */
    dsi_scratch s;
    float *inv_freq;        /* [rope/2] */
    float rope_mscale;      /* multiplies cos and sin */
    float softmax_scale;
    dsi_step_seq *seqs;     /* [max seqs = max_tokens] */
    int n_seqs, T;
    double prof[8];         /* seconds per stage when DSI_PROFILE is set (see engine.c) */
    int profile;
    float *lm_buf;          /* [LM_GROUP][hidden + vocab]: last rows of several sequences and
                             * their logits, for one lm_head matmul (allocated on first use) */
    float *capture;         /* optional hidden-state capture */
    int capture_tokens;
    /* Called after each matmul on the calling thread: the expert-parallel
     * runtime progresses its nonblocking transfers there (Open MPI moves
     * data only while polled). NULL when unused. */
    void (*poll_hook)(void *ctx);
    void *poll_ctx;
};

/* A micro-batch's step state. The stages read the engine's current state
 * (e->s, e->seqs, e->n_seqs, e->T); the dual micro-batch schedule keeps a
 * second one here and swaps it in and out around each stage. */
typedef struct dsi_ubatch {
    dsi_scratch s;
    dsi_step_seq *seqs;     /* [max_tokens] */
    int n_seqs, T;
} dsi_ubatch;

/* Allocates scratch and sequence table like the engine's own (zeroed `u`). */
int dsi__ubatch_init(dsi_engine *e, dsi_ubatch *u);
void dsi__ubatch_free(dsi_engine *e, dsi_ubatch *u);
/* Exchanges the engine's current micro-batch state with `u`. */
void dsi__ubatch_swap(dsi_engine *e, dsi_ubatch *u);

/* Validates a batch, lays out its rows and embeds its tokens into the
 * current state. n_seqs == 0 is allowed (an empty micro-batch, T = 0). */
int dsi__step_begin(dsi_engine *e, const dsi_seq_step *seqs, int n_seqs);
/* Final norm and lm_head for the rows that want logits. */
void dsi__step_end(dsi_engine *e, const dsi_seq_step *seqs, int n_seqs);

/* With FP8 activations, matmuls of this many rows or more go through the
 * FP8 x FP8 GEMM (engine.c try_q8); fewer through the float kernels on
 * quantised rows. */
#define DSI_Q8_MIN_ROWS 8

/* y[M][N] = x[M][K] W^T, parallel over N (rows of W). `accumulate` adds. */
void dsi__matmul(dsi_engine *e, const dsi_mat *W, const float *x, int M, int ldx, float *y, int ldy, int accumulate);
/* Same restricted to rows [n0, n1) of W, written to y columns [0, n1-n0). */
void dsi__matmul_rows(dsi_engine *e, const dsi_mat *W, int n0, int n1, const float *x, int M, int ldx, float *y,
                      int ldy);

/* x [M][*ldx], or a copy of its first K columns with rows 16 floats longer
 * when its rows are a multiple of 2 KB apart (they thrash L1 in the panel
 * GEMMs), in s.xq: valid until the next matmul that pads. dsi__matmul pads
 * its own input; callers running several matmuls on one x pad it once. */
const float *dsi__pad_rows(dsi_engine *e, const float *x, int M, int K, int *ldx);

/* The kernel entry dsi__matmul uses (row-wise under batch invariance). */
dsi_matmul_fn dsi__matmul_fn(const dsi_engine *e);

/* The thread pool for a job of about `flops` work, or NULL (run inline) when
 * waking the other threads would cost more than it saves: a wake-up is
 * microseconds, and a thread the OS has descheduled costs a time slice. */
dsi_pool *dsi__pool_for_work(const dsi_engine *e, double flops);

void dsi__rmsnorm(const float *x, const float *w, int n, float eps, float *out);
/* dsi__rmsnorm on T rows (x [T][ldx] -> out [T][ldo], out may be x), split
 * over the pool from ROWS_PARALLEL_MIN rows on. */
void dsi__rmsnorm_rows(dsi_engine *e, const float *x, size_t ldx, const float *w, int n, float eps, float *out,
                       size_t ldo, int T);
#define ROWS_PARALLEL_MIN 32
/* Rotates v [rope] in place by a row's s.rope_cs entry (filled by
 * dsi__step_begin for its position). */
void dsi__rope(const dsi_engine *e, float *v, const float *cs);

/* Stages (ARCHITECTURE-SKETCH): each works on the whole step's rows. */
int dsi__stage_attn0(dsi_engine *e, int layer);
int dsi__stage_attn1(dsi_engine *e, int layer);
int dsi__stage_ffn(dsi_engine *e, int layer); /* = gate + shared + routed_local */
/* MoE layers only: router and top-k into s.topk_ids / s.topk_w. */
int dsi__stage_gate(dsi_engine *e, int layer);
/* MoE layers: shared experts added into x; dense layers: the whole MLP. */
int dsi__stage_shared(dsi_engine *e, int layer);
/* DISPATCH + MLP + COMBINE within one process (a permutation). */
int dsi__stage_routed_local(dsi_engine *e, int layer);
/* One routed expert over n rows [n][ldx] in place (outputs overwrite the
 * inputs). h1, h2: [n][moe_inter] scratch. n must be <= max_tokens when FP8
 * activations are on (their quantisation scratch is sized so). */
/* The rounding expert parallelism applies to a routed expert's input row
 * (dispatch) and output row (combine); see dsi_moe_io. ep/xfer.c encodes
 * with the same scale so both give the same numbers. */
void dsi__moe_io_round_in(const dsi_kernels *k, dsi_moe_io mode, float *x, int D);
void dsi__moe_io_round_out(dsi_moe_io mode, float *y, int D);
void dsi__expert_mlp(dsi_engine *e, int layer, int expert, float *rows, int n, int ldx, float *h1, float *h2);

/* MoE gate for one token: ids/weights [topk]. scores scratch [2*E]. */
void dsi__moe_gate(const dsi_config *c, const float *logits, const float *bias, int *ids, float *w, float *scratch);

#endif
