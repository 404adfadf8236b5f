/* dsinfer/model.h - DeepSeek-V3 configuration and weights.
 *
 * A model is a config plus borrowed views into a safetensors set (mmapped
 * checkpoint or an in-memory image). Linear weights stay in their stored dtype
 * (FP8 e4m3 with 128x128 block scales, BF16, F16 or F32); only the small
 * vectors (norms, router bias) are converted to float32 at load.
 *
 *     dsi_model *m;
 *     if (dsi_model_load("DeepSeek-V3/", NULL, &m) != DSI_OK) die(dsi_last_error());
 *     printf("%d layers\n", dsi_model_config(m)->n_layers);
 *     dsi_model_destroy(m);
 */
#ifndef DSINFER_MODEL_H
#define DSINFER_MODEL_H

#include "dsinfer/common.h"
#include "dsinfer/safetensors.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct dsi_config {
    int vocab_size;
    int hidden;                 /* hidden_size */
    int n_layers;               /* num_hidden_layers (MTP layers excluded) */
    int dense_inter;            /* intermediate_size (dense MLP layers) */
    int moe_inter;              /* moe_intermediate_size (per expert) */
    int first_k_dense;          /* first_k_dense_replace */
    int moe_layer_freq;         /* layer i is MoE iff i >= first_k_dense && i % freq == 0 */
    int n_heads;                /* num_attention_heads */
    int q_lora_rank;            /* 0: plain q_proj */
    int kv_lora_rank;
    int qk_nope_dim, qk_rope_dim, v_head_dim;
    int n_experts;              /* n_routed_experts */
    int n_experts_per_tok;      /* top-k */
    int n_group, topk_group;
    int n_shared_experts;
    int norm_topk_prob;
    float routed_scaling_factor;
    int use_correction_bias;    /* topk_method noaux_tc */
    double rms_norm_eps;
    double rope_theta;
    int rope_interleave;        /* pairs (2i, 2i+1) as DeepSeek's reference */
    /* YaRN (rope_scaling.type == "yarn"); yarn == 0 means plain rope */
    int yarn;
    double yarn_factor, yarn_orig_max_pos, yarn_beta_fast, yarn_beta_slow, yarn_mscale, yarn_mscale_all_dim;
    int max_position_embeddings;
    int n_nextn_layers;         /* num_nextn_predict_layers (MTP weights present, not used) */
    int bos_token_id, eos_token_id;
    /* eos_token_id as a list (transformers allows one; any of them ends a
     * generation): eos_token_ids[0] == eos_token_id. 0 ids: eos_token_id alone. */
#define DSI_MAX_EOS_IDS 7
    int eos_token_ids[DSI_MAX_EOS_IDS], n_eos_token_ids;
    int tie_word_embeddings;
    int fp8;                    /* quantization_config fp8 e4m3 */
    int weight_block[2];        /* [rows, cols] of a scale block, 128x128 */
} dsi_config;

/* Parses a Hugging Face config.json (model_type deepseek_v3; kimi_k2 is
 * accepted with the same fields). Unsupported values (another model_type,
 * scoring_func other than sigmoid, topk_method other than noaux_tc,
 * hidden_act other than silu, rope_scaling other than yarn, attention_bias,
 * a quantization method other than fp8 e4m3 with dynamic activations) give
 * DSI_EUNSUPPORTED naming the field; a field of the wrong type gives
 * DSI_EFORMAT naming it. */
int dsi_config_parse(const char *json, size_t len, dsi_config *out);
int dsi_config_load(const char *path, dsi_config *out);
/* Writes config.json text (malloc'ed, caller frees) for `c`. */
char *dsi_config_to_json(const dsi_config *c);
/* Checks internal consistency (divisibility, positive sizes). */
int dsi_config_validate(const dsi_config *c);

/* Derived sizes */
static inline int dsi_config_qk_head_dim(const dsi_config *c) { return c->qk_nope_dim + c->qk_rope_dim; }
static inline int dsi_config_kv_dim(const dsi_config *c) { return c->kv_lora_rank + c->qk_rope_dim; }
static inline int dsi_config_is_moe_layer(const dsi_config *c, int l) {
    return c->n_experts > 0 && l >= c->first_k_dense && (l % (c->moe_layer_freq ? c->moe_layer_freq : 1)) == 0;
}

/* RoPE constants for `c`: inv_freq [qk_rope_dim/2] (YaRN-scaled when
 * configured), the factor on cos and sin, and the attention softmax scale
 * (qk_head_dim^-0.5 x mscale(factor, mscale_all_dim)^2), as HF computes them. */
void dsi_config_rope(const dsi_config *c, float *inv_freq, float *rope_mscale, float *softmax_scale);

typedef struct dsi_model dsi_model;

typedef struct dsi_load_opts {
    int progress;        /* print load progress on stderr: 1 yes, 0 no, -1 when > 1 GiB (NULL opts: -1) */
    int prefault;        /* touch every page at load (default 0) */
    int no_mmap;         /* copy weights into anonymous memory (faster decode; no page-cache sharing) */
} dsi_load_opts;

/* Loads config.json and the weights from a checkpoint directory. */
int dsi_model_load(const char *dir, const dsi_load_opts *opts, dsi_model **out);
/* Builds a model from a config and an opened tensor set; takes ownership of
 * `set` (closed by dsi_model_destroy, also on failure). */
int dsi_model_from_set(const dsi_config *cfg, dsi_st_set *set, const char *name, dsi_model **out);
void dsi_model_destroy(dsi_model *m);
const dsi_config *dsi_model_config(const dsi_model *m);
/* A stable identity of config + weights (hash of config and tensor headers
 * and sampled bytes): prefix-cache and disk-tier keys include it. */
uint64_t dsi_model_fingerprint(const dsi_model *m);
const char *dsi_model_name(const dsi_model *m);
/* Bytes of weights read per decoded token (active parameters), for bounds. */
double dsi_model_active_bytes_per_token(const dsi_model *m);
double dsi_model_total_bytes(const dsi_model *m);
/* FLOPs of the linear layers per token (2 x active linear params). */
double dsi_model_flops_per_token(const dsi_model *m);

/* ---- random-weight checkpoints (dsinfer make-model) ---- */
typedef enum { DSI_PRESET_TINY, DSI_PRESET_SMALL, DSI_PRESET_V3 } dsi_preset;
/* Fills `c` for a preset. For DSI_PRESET_V3, n_layers is the layer count
 * (first 3 dense, rest MoE, as DeepSeek-V3 with fewer layers). */
int dsi_config_preset(dsi_preset p, int n_layers, int fp8, dsi_config *c);
/* Writes a checkpoint directory (config.json + shards of <= shard_bytes +
 * index). Deterministic for a seed. */
int dsi_make_model(const dsi_config *c, const char *dir, uint64_t seed, size_t shard_bytes, int progress);
/* Builds the same random model in memory (for the built-in demo). */
int dsi_make_model_memory(const dsi_config *c, uint64_t seed, dsi_model **out);

#ifdef __cplusplus
}
#endif
#endif
