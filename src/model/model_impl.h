/* Internal layout of a loaded model: borrowed weight views per layer. */
#ifndef DSI_MODEL_IMPL_H
#define DSI_MODEL_IMPL_H

#include "dsinfer/model.h"

/* A linear layer's weight W [rows = out features, cols = in features],
 * row-major in its stored dtype. y = W x. */
typedef struct dsi_mat {
    dsi_dtype dtype;        /* DSI_F8_E4M3, DSI_BF16, DSI_F16 or DSI_F32 */
    int rows, cols;
    const void *data;       /* borrowed: [rows][cols] */
    const float *scale_inv; /* FP8 only, borrowed: [ceil(rows/br)][ceil(cols/bc)] */
    int block_rows, block_cols;
    int scale_cols;         /* ceil(cols / block_cols) */
} dsi_mat;

typedef struct dsi_layer {
    float *attn_norm;       /* [hidden] owned */
    float *ffn_norm;        /* [hidden] owned */
    /* MLA */
    dsi_mat q_a;            /* [q_lora, hidden] (q_lora_rank > 0) */
    float *q_a_norm;        /* [q_lora] owned */
    dsi_mat q_b;            /* [heads*(nope+rope), q_lora] */
    dsi_mat q_proj;         /* [heads*(nope+rope), hidden] (q_lora_rank == 0) */
    dsi_mat kv_a;           /* [kv_lora + rope, hidden] */
    float *kv_a_norm;       /* [kv_lora] owned */
    dsi_mat kv_b;           /* [heads*(nope+v), kv_lora] */
    dsi_mat o_proj;         /* [hidden, heads*v] */
    /* FFN */
    int is_moe;
    dsi_mat gate, up, down; /* dense MLP: [inter, hidden] x2, [hidden, inter] */
    dsi_mat router;         /* [n_experts, hidden] */
    float *router_bias;     /* [n_experts] owned (e_score_correction_bias) */
    dsi_mat *exp_gate, *exp_up, *exp_down; /* [n_experts] arrays, owned arrays of views */
    dsi_mat sh_gate, sh_up, sh_down;       /* shared experts (n_shared * moe_inter wide) */
} dsi_layer;

struct dsi_model {
    dsi_config cfg;
    char *name;
    dsi_st_set *set;        /* owned: the mapping every view borrows from */
    void *image;            /* owned in-memory checkpoint image (demo), or NULL */
    dsi_mat embed;          /* [vocab, hidden] */
    dsi_layer *layers;      /* [n_layers] */
    float *final_norm;      /* [hidden] owned */
    dsi_mat lm_head;        /* [vocab, hidden] */
    uint64_t fingerprint;
};

/* Calls fn for every weight matrix a decoded token reads: the LM head, then
 * per layer MLA's, the dense MLP's or the router's and shared expert's, and
 * routed expert 0's standing for each of the n_experts_per_tok chosen
 * (`times`). Matrices a model lacks come with data NULL. The one list behind
 * dsi_model_active_bytes_per_token and dsi_model_flops_per_token. */
void dsi__model_token_mats(const dsi_model *m, void (*fn)(const dsi_mat *W, int times, void *ctx), void *ctx);

#endif
