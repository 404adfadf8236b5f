/* Binds a safetensors set to DeepSeek-V3's tensor names, checking every
 * tensor's presence, dtype and shape before anything is computed. */
#include "model/model_impl.h"
#include "kernels/dtype.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <xxhash.h>

typedef struct binder {
    const dsi_st_set *set;
    const dsi_config *cfg;
    unsigned char *used;    /* [dsi_st_count(set)]: bound by the model */
} binder;

static int find_checked(const binder *b, const char *name, int rows, int cols, const dsi_tensor **out) {
    const dsi_tensor *t = dsi_st_find(b->set, name);
    if (!t) return dsi_error(DSI_ENOTFOUND, "missing tensor '%s'", name);
    b->used[t - dsi_st_at(b->set, 0)] = 1;
    int ok = cols > 0 ? (t->n_dims == 2 && t->shape[0] == rows && t->shape[1] == cols)
                      : (t->n_dims == 1 && t->shape[0] == rows);
    if (!ok) {
        char got[128] = "";
        for (int d = 0; d < t->n_dims; d++)
            snprintf(got + strlen(got), sizeof got - strlen(got), "%s%lld", d ? "," : "", (long long)t->shape[d]);
        if (cols > 0)
            return dsi_error(DSI_EFORMAT, "%s: tensor '%s' has shape [%s], expected [%d,%d]", t->file, name, got, rows, cols);
        return dsi_error(DSI_EFORMAT, "%s: tensor '%s' has shape [%s], expected [%d]", t->file, name, got, rows);
    }
    *out = t;
    return DSI_OK;
}

/* A linear weight: FP8 needs its scale_inv; BF16/F16/F32 are used as stored. */
static int bind_mat(const binder *b, const char *name, int rows, int cols, dsi_mat *m) {
    const dsi_tensor *t;
    int rc = find_checked(b, name, rows, cols, &t);
    if (rc) return rc;
    memset(m, 0, sizeof *m);
    m->dtype = t->dtype;
    m->rows = rows;
    m->cols = cols;
    m->data = t->data;
    if (t->dtype == DSI_F8_E4M3) {
        char sname[512];
        snprintf(sname, sizeof sname, "%s_scale_inv", name);
        int br = b->cfg->weight_block[0], bc = b->cfg->weight_block[1];
        if (br <= 0 || bc <= 0) /* a hand-built config without quantization_config */
            return dsi_error(DSI_EFORMAT, "%s: tensor '%s' is F8_E4M3 but the config has no weight block size",
                             t->file, name);
        if (!dsi_st_find(b->set, sname))
            return dsi_error(DSI_ENOTFOUND, "%s: tensor '%s' is F8_E4M3 but its scale '%s' is missing", t->file, name,
                             sname);
        const dsi_tensor *s;
        rc = find_checked(b, sname, DSI_CEIL_DIV(rows, br), DSI_CEIL_DIV(cols, bc), &s);
        if (rc) return rc;
        if (s->dtype != DSI_F32)
            return dsi_error(DSI_EFORMAT, "%s: tensor '%s' is %s, expected F32", s->file, sname, dsi_dtype_name(s->dtype));
        if (((uintptr_t)s->data & 3) != 0)
            return dsi_error(DSI_EFORMAT, "%s: tensor '%s' is not 4-byte aligned", s->file, sname);
        /* one NaN or inf scale makes every logit NaN; the scales are 1/16384 of the weights */
        for (size_t i = 0; i < s->size_bytes / 4; i++)
            if (!isfinite(((const float *)s->data)[i]))
                return dsi_error(DSI_EFORMAT, "%s: tensor '%s' has a non-finite value at element %zu", s->file,
                                 sname, i);
        m->scale_inv = s->data;
        m->block_rows = br;
        m->block_cols = bc;
        m->scale_cols = DSI_CEIL_DIV(cols, bc);
    } else if (t->dtype != DSI_BF16 && t->dtype != DSI_F16 && t->dtype != DSI_F32) {
        return dsi_error(DSI_EUNSUPPORTED, "%s: tensor '%s' has dtype %s (linear weights must be F8_E4M3, BF16, F16 or F32)",
                         t->file, name, dsi_dtype_name(t->dtype));
    }
    if (t->dtype == DSI_F32 && ((uintptr_t)t->data & 3))
        return dsi_error(DSI_EFORMAT, "%s: tensor '%s' is not 4-byte aligned", t->file, name);
    if ((t->dtype == DSI_BF16 || t->dtype == DSI_F16) && ((uintptr_t)t->data & 1))
        return dsi_error(DSI_EFORMAT, "%s: tensor '%s' is not 2-byte aligned", t->file, name);
    return DSI_OK;
}

/* A vector converted to an owned float32 array. */
static int bind_vec(const binder *b, const char *name, int n, float **out) {
    const dsi_tensor *t;
    int rc = find_checked(b, name, n, 0, &t);
    if (rc) return rc;
    float *v = malloc(sizeof(float) * n);
    if (!v) return dsi_error(DSI_ENOMEM, "out of memory");
    const uint8_t *p = t->data;
    for (int i = 0; i < n; i++) {
        switch (t->dtype) {
        case DSI_F32: memcpy(&v[i], p + 4 * i, 4); break;
        case DSI_BF16: { uint16_t h; memcpy(&h, p + 2 * i, 2); v[i] = dsi_bf16_to_f32(h); break; }
        case DSI_F16: { uint16_t h; memcpy(&h, p + 2 * i, 2); v[i] = dsi_f16_to_f32(h); break; }
        default:
            free(v);
            return dsi_error(DSI_EFORMAT, "%s: tensor '%s' has dtype %s (expected F32/BF16/F16)", t->file, name,
                             dsi_dtype_name(t->dtype));
        }
        if (!isfinite(v[i])) {
            free(v);
            return dsi_error(DSI_EFORMAT, "%s: tensor '%s' has a non-finite value at element %d", t->file, name, i);
        }
    }
    *out = v;
    return DSI_OK;
}

static void free_layer(dsi_layer *L) {
    free(L->attn_norm); free(L->ffn_norm); free(L->q_a_norm); free(L->kv_a_norm); free(L->router_bias);
    free(L->exp_gate); free(L->exp_up); free(L->exp_down);
}

void dsi_model_destroy(dsi_model *m) {
    if (!m) return;
    if (m->layers)
        for (int l = 0; l < m->cfg.n_layers; l++) free_layer(&m->layers[l]);
    free(m->layers);
    free(m->final_norm);
    dsi_st_close(m->set);
    free(m->image);
    free(m->name);
    free(m);
}

const dsi_config *dsi_model_config(const dsi_model *m) { return &m->cfg; }
uint64_t dsi_model_fingerprint(const dsi_model *m) { return m->fingerprint; }
const char *dsi_model_name(const dsi_model *m) { return m->name; }

#define B(call) do { rc = (call); if (rc) goto fail; } while (0)

static int bind_layer(const binder *b, int l, dsi_layer *L) {
    const dsi_config *c = b->cfg;
    char n[256];
    int rc;
    int H = c->n_heads, qk = dsi_config_qk_head_dim(c);
#define NAME(...) (snprintf(n, sizeof n, __VA_ARGS__), n)
    B(bind_vec(b, NAME("model.layers.%d.input_layernorm.weight", l), c->hidden, &L->attn_norm));
    B(bind_vec(b, NAME("model.layers.%d.post_attention_layernorm.weight", l), c->hidden, &L->ffn_norm));
    if (c->q_lora_rank > 0) {
        B(bind_mat(b, NAME("model.layers.%d.self_attn.q_a_proj.weight", l), c->q_lora_rank, c->hidden, &L->q_a));
        B(bind_vec(b, NAME("model.layers.%d.self_attn.q_a_layernorm.weight", l), c->q_lora_rank, &L->q_a_norm));
        B(bind_mat(b, NAME("model.layers.%d.self_attn.q_b_proj.weight", l), H * qk, c->q_lora_rank, &L->q_b));
    } else {
        B(bind_mat(b, NAME("model.layers.%d.self_attn.q_proj.weight", l), H * qk, c->hidden, &L->q_proj));
    }
    B(bind_mat(b, NAME("model.layers.%d.self_attn.kv_a_proj_with_mqa.weight", l), c->kv_lora_rank + c->qk_rope_dim,
               c->hidden, &L->kv_a));
    B(bind_vec(b, NAME("model.layers.%d.self_attn.kv_a_layernorm.weight", l), c->kv_lora_rank, &L->kv_a_norm));
    B(bind_mat(b, NAME("model.layers.%d.self_attn.kv_b_proj.weight", l), H * (c->qk_nope_dim + c->v_head_dim),
               c->kv_lora_rank, &L->kv_b));
    B(bind_mat(b, NAME("model.layers.%d.self_attn.o_proj.weight", l), c->hidden, H * c->v_head_dim, &L->o_proj));
    L->is_moe = dsi_config_is_moe_layer(c, l);
    if (!L->is_moe) {
        B(bind_mat(b, NAME("model.layers.%d.mlp.gate_proj.weight", l), c->dense_inter, c->hidden, &L->gate));
        B(bind_mat(b, NAME("model.layers.%d.mlp.up_proj.weight", l), c->dense_inter, c->hidden, &L->up));
        B(bind_mat(b, NAME("model.layers.%d.mlp.down_proj.weight", l), c->hidden, c->dense_inter, &L->down));
        return DSI_OK;
    }
    int E = c->n_experts;
    B(bind_mat(b, NAME("model.layers.%d.mlp.gate.weight", l), E, c->hidden, &L->router));
    if (L->router.dtype == DSI_F8_E4M3) {
        rc = dsi_error(DSI_EFORMAT, "%s: tensor '%s': the router must not be FP8", dsi_st_find(b->set, n)->file, n);
        goto fail;
    }
    B(bind_vec(b, NAME("model.layers.%d.mlp.gate.e_score_correction_bias", l), E, &L->router_bias));
    L->exp_gate = calloc(E, sizeof(dsi_mat));
    L->exp_up = calloc(E, sizeof(dsi_mat));
    L->exp_down = calloc(E, sizeof(dsi_mat));
    if (!L->exp_gate || !L->exp_up || !L->exp_down) { rc = dsi_error(DSI_ENOMEM, "out of memory"); goto fail; }
    for (int e = 0; e < E; e++) {
        B(bind_mat(b, NAME("model.layers.%d.mlp.experts.%d.gate_proj.weight", l, e), c->moe_inter, c->hidden, &L->exp_gate[e]));
        B(bind_mat(b, NAME("model.layers.%d.mlp.experts.%d.up_proj.weight", l, e), c->moe_inter, c->hidden, &L->exp_up[e]));
        B(bind_mat(b, NAME("model.layers.%d.mlp.experts.%d.down_proj.weight", l, e), c->hidden, c->moe_inter, &L->exp_down[e]));
    }
    if (c->n_shared_experts > 0) {
        int si = c->moe_inter * c->n_shared_experts;
        B(bind_mat(b, NAME("model.layers.%d.mlp.shared_experts.gate_proj.weight", l), si, c->hidden, &L->sh_gate));
        B(bind_mat(b, NAME("model.layers.%d.mlp.shared_experts.up_proj.weight", l), si, c->hidden, &L->sh_up));
        B(bind_mat(b, NAME("model.layers.%d.mlp.shared_experts.down_proj.weight", l), c->hidden, si, &L->sh_down));
    }
    return DSI_OK;
fail:
    return rc;
#undef NAME
}

/* Independent of the order tensors are stored in (shards, or one in-memory
 * image, lay them out differently): per-tensor hashes are summed. */
static uint64_t fingerprint(const dsi_model *m) {
    XXH3_state_t *st = XXH3_createState();
    if (!st) return 0; /* out of memory: an identity that matches nothing cached */
    uint64_t h = XXH3_64bits(&m->cfg, sizeof m->cfg);
    int n = dsi_st_count(m->set);
    for (int i = 0; i < n; i++) {
        const dsi_tensor *t = dsi_st_at(m->set, i);
        XXH3_64bits_reset(st);
        XXH3_64bits_update(st, t->name, strlen(t->name));
        XXH3_64bits_update(st, t->shape, sizeof t->shape);
        /* sample the first and last 64 bytes of each tensor: cheap, catches re-quantised weights */
        size_t k = t->size_bytes < 64 ? t->size_bytes : 64;
        XXH3_64bits_update(st, t->data, k);
        XXH3_64bits_update(st, (const uint8_t *)t->data + t->size_bytes - k, k);
        h += XXH3_64bits_digest(st);
    }
    XXH3_freeState(st);
    return h;
}

/* Whether `name` belongs to one of the MTP modules stored after the last
 * layer (model.layers.{n_layers + i}., i < num_nextn_predict_layers): not
 * used, but part of a DeepSeek-V3 checkpoint. */
static int is_mtp_tensor(const dsi_config *c, const char *name) {
    const char *p = "model.layers.";
    if (strncmp(name, p, strlen(p))) return 0;
    char *end;
    long l = strtol(name + strlen(p), &end, 10);
    return end != name + strlen(p) && *end == '.' && l >= c->n_layers && l < (long)c->n_layers + c->n_nextn_layers;
}

int dsi_model_from_set(const dsi_config *cfg, dsi_st_set *set, const char *name, dsi_model **out) {
    *out = NULL;
    int rc = dsi_config_validate(cfg);
    if (rc) { dsi_st_close(set); return rc; }
    dsi_model *m = calloc(1, sizeof *m);
    if (!m) { dsi_st_close(set); return dsi_error(DSI_ENOMEM, "out of memory"); }
    m->cfg = *cfg;
    m->set = set;
    m->name = strdup(name ? name : "model");
    binder b = {set, &m->cfg, calloc(dsi_st_count(set) + 1, 1)};
    const dsi_config *c = &m->cfg;
    m->layers = calloc(c->n_layers, sizeof(dsi_layer));
    if (!m->layers || !m->name || !b.used) { rc = dsi_error(DSI_ENOMEM, "out of memory"); goto fail; }
    B(bind_mat(&b, "model.embed_tokens.weight", c->vocab_size, c->hidden, &m->embed));
    if (m->embed.dtype == DSI_F8_E4M3) {
        rc = dsi_error(DSI_EFORMAT, "%s: tensor 'model.embed_tokens.weight': embeddings must not be FP8",
                       dsi_st_find(set, "model.embed_tokens.weight")->file);
        goto fail;
    }
    for (int l = 0; l < c->n_layers; l++) B(bind_layer(&b, l, &m->layers[l]));
    B(bind_vec(&b, "model.norm.weight", c->hidden, &m->final_norm));
    if (c->tie_word_embeddings) m->lm_head = m->embed;
    else B(bind_mat(&b, "lm_head.weight", c->vocab_size, c->hidden, &m->lm_head));
    /* A tensor nothing binds means the config describes another model than
     * the weights: fewer layers, no shared experts, a tied lm_head... */
    for (int i = 0; i < dsi_st_count(set); i++) {
        const dsi_tensor *t = dsi_st_at(set, i);
        size_t nl = strlen(t->name), nb = strlen(".rotary_emb.inv_freq");
        /* rotary_emb.inv_freq: a buffer older transformers saved with the weights, and ignores on load */
        int inv_freq = nl > nb && !strcmp(t->name + nl - nb, ".rotary_emb.inv_freq");
        if (b.used[i] || is_mtp_tensor(c, t->name) || inv_freq) continue;
        rc = dsi_error(DSI_EFORMAT,
                       "%s: tensor '%s' is not used by the model config.json describes (num_hidden_layers %d, "
                       "num_nextn_predict_layers %d, n_shared_experts %d, tie_word_embeddings %s): config and "
                       "weights do not match",
                       t->file, t->name, c->n_layers, c->n_nextn_layers, c->n_shared_experts,
                       c->tie_word_embeddings ? "true" : "false");
        goto fail;
    }
    free(b.used);
    m->fingerprint = fingerprint(m);
    *out = m;
    return DSI_OK;
fail:
    free(b.used);
    dsi_model_destroy(m);
    return rc;
}

int dsi_model_load(const char *dir, const dsi_load_opts *opts, dsi_model **out) {
    *out = NULL;
    char path[4096];
    dsi_config cfg;
    snprintf(path, sizeof path, "%s/config.json", dir);
    int rc = dsi_config_load(path, &cfg);
    if (rc) return rc;
    dsi_st_set *set;
    double t0 = dsi_now();
    rc = dsi_st_open_dir(dir, &set);
    if (rc) return rc;
    size_t total = dsi_st_total_bytes(set);
    int progress = opts && opts->progress >= 0 ? opts->progress : total > (1ull << 30); /* -1: automatic */
    if (progress)
        fprintf(stderr, "dsinfer: %s: %d tensors, %.2f GB in %s\n", dir, dsi_st_count(set), total / 1e9,
                cfg.fp8 ? "FP8 e4m3 (128x128 block scales)" : "BF16");
    if (opts && opts->no_mmap) {
        if (progress) fprintf(stderr, "dsinfer: copying weights into resident memory\n");
        rc = dsi_st_make_resident(set, 1);
        if (rc) { dsi_st_close(set); return rc; }
    }
    if (opts && opts->prefault && !opts->no_mmap) {
        /* Touch every page so the first forward pass does not pay the page faults. */
        volatile uint8_t sink = 0;
        size_t done = 0, next = 0;
        int n = dsi_st_count(set);
        for (int i = 0; i < n; i++) {
            const dsi_tensor *t = dsi_st_at(set, i);
            for (size_t o = 0; o < t->size_bytes; o += 4096) sink ^= ((const uint8_t *)t->data)[o];
            done += t->size_bytes;
            if (progress && done >= next) {
                fprintf(stderr, "\rdsinfer: loading weights %5.1f%% (%.2f / %.2f GB, %.1f s)", 100.0 * done / total,
                        done / 1e9, total / 1e9, dsi_now() - t0);
                next = done + total / 100;
            }
        }
        if (progress) fputc('\n', stderr);
        (void)sink;
    }
    const char *base = strrchr(dir, '/');
    base = (base && base[1]) ? base + 1 : dir;
    rc = dsi_model_from_set(&cfg, set, base, out);
    if (rc) return dsi_error_prefix(rc, "%s", dir);
    if (progress) fprintf(stderr, "dsinfer: model ready in %.2f s\n", dsi_now() - t0);
    return DSI_OK;
}

void dsi__model_token_mats(const dsi_model *m, void (*fn)(const dsi_mat *W, int times, void *ctx), void *ctx) {
    const dsi_config *c = &m->cfg;
    fn(&m->lm_head, 1, ctx);
    for (int l = 0; l < c->n_layers; l++) {
        const dsi_layer *L = &m->layers[l];
        const dsi_mat *attn[] = {&L->q_a, &L->q_b, &L->q_proj, &L->kv_a, &L->kv_b, &L->o_proj};
        for (size_t i = 0; i < sizeof attn / sizeof *attn; i++) fn(attn[i], 1, ctx);
        if (!L->is_moe) {
            fn(&L->gate, 1, ctx), fn(&L->up, 1, ctx), fn(&L->down, 1, ctx);
        } else {
            fn(&L->router, 1, ctx), fn(&L->sh_gate, 1, ctx), fn(&L->sh_up, 1, ctx), fn(&L->sh_down, 1, ctx);
            fn(&L->exp_gate[0], c->n_experts_per_tok, ctx);
            fn(&L->exp_up[0], c->n_experts_per_tok, ctx);
            fn(&L->exp_down[0], c->n_experts_per_tok, ctx);
        }
    }
}

static void add_bytes(const dsi_mat *W, int times, void *ctx) {
    if (!W->data) return;
    double b = (double)W->rows * W->cols * dsi_dtype_size(W->dtype);
    if (W->scale_inv) b += 4.0 * DSI_CEIL_DIV(W->rows, W->block_rows) * W->scale_cols;
    *(double *)ctx += times * b;
}

double dsi_model_active_bytes_per_token(const dsi_model *m) {
    double b = (double)m->cfg.hidden * dsi_dtype_size(m->embed.dtype); /* the embedding row */
    dsi__model_token_mats(m, add_bytes, &b);
    return b;
}

double dsi_model_total_bytes(const dsi_model *m) { return (double)dsi_st_total_bytes(m->set); }

static void add_flops(const dsi_mat *W, int times, void *ctx) {
    if (W->data) *(double *)ctx += times * 2.0 * W->rows * W->cols;
}

double dsi_model_flops_per_token(const dsi_model *m) {
    double f = 0;
    dsi__model_token_mats(m, add_flops, &f);
    return f;
}
