/* Random-weight checkpoints in DeepSeek's real format (dsinfer make-model)
 * and presets. Weights are uniform with the variance of a scaled init, FP8
 * quantised per 128x128 block (scale = amax/448) exactly as DeepSeek ships
 * V3, so the loader and kernels see realistic data. */
#include "core/threadpool.h"
#include "dsinfer/model.h"
#include "kernels/dtype.h"
#include "model/model_impl.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

int dsi_config_preset(dsi_preset p, int n_layers, int fp8, dsi_config *c) {
    memset(c, 0, sizeof *c);
    c->rope_theta = 10000;
    c->rms_norm_eps = 1e-6;
    c->rope_interleave = 1;
    c->yarn = 1;
    c->yarn_factor = 40;
    c->yarn_orig_max_pos = 4096;
    c->yarn_beta_fast = 32;
    c->yarn_beta_slow = 1;
    c->yarn_mscale = 1;
    c->yarn_mscale_all_dim = 1;
    c->max_position_embeddings = 163840;
    c->norm_topk_prob = 1;
    c->routed_scaling_factor = 2.5f;
    c->use_correction_bias = 1;
    c->moe_layer_freq = 1;
    c->bos_token_id = 0;
    c->eos_token_id = c->eos_token_ids[0] = 1;
    c->n_eos_token_ids = 1;
    c->fp8 = fp8;
    c->weight_block[0] = c->weight_block[1] = 128;
    switch (p) {
    case DSI_PRESET_TINY: /* the golden models' shape */
        c->vocab_size = 2048; c->hidden = 256; c->dense_inter = 512; c->moe_inter = 128;
        c->n_layers = 4; c->first_k_dense = 1; c->n_heads = 4; c->q_lora_rank = 192;
        c->kv_lora_rank = 128; c->qk_rope_dim = 32; c->qk_nope_dim = 64; c->v_head_dim = 64;
        c->n_experts = 16; c->n_experts_per_tok = 4; c->n_group = 4; c->topk_group = 2; c->n_shared_experts = 1;
        break;
    case DSI_PRESET_SMALL: /* ~3.75B total, ~0.67B active */
        c->vocab_size = 32000; c->hidden = 2048; c->dense_inter = 8192; c->moe_inter = 768;
        c->n_layers = 12; c->first_k_dense = 1; c->n_heads = 16; c->q_lora_rank = 768;
        c->kv_lora_rank = 512; c->qk_rope_dim = 64; c->qk_nope_dim = 128; c->v_head_dim = 128;
        c->n_experts = 64; c->n_experts_per_tok = 6; c->n_group = 8; c->topk_group = 4; c->n_shared_experts = 2;
        break;
    case DSI_PRESET_V3: /* DeepSeek-V3 width, n_layers layers (first 3 dense) */
        c->vocab_size = 129280; c->hidden = 7168; c->dense_inter = 18432; c->moe_inter = 2048;
        c->n_layers = n_layers > 0 ? n_layers : 4; c->first_k_dense = 3; c->n_heads = 128; c->q_lora_rank = 1536;
        c->kv_lora_rank = 512; c->qk_rope_dim = 64; c->qk_nope_dim = 128; c->v_head_dim = 128;
        c->n_experts = 256; c->n_experts_per_tok = 8; c->n_group = 8; c->topk_group = 4; c->n_shared_experts = 1;
        if (c->first_k_dense > c->n_layers) c->first_k_dense = c->n_layers;
        break;
    default: return dsi_error(DSI_EINVAL, "unknown preset");
    }
    return DSI_OK;
}

/* splitmix64: deterministic, seeded per tensor so shards are reproducible */
static uint64_t mix(uint64_t *s) {
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}
static float unif(uint64_t *s) { return (float)((mix(s) >> 40) * (1.0 / 16777216.0)) * 2.0f - 1.0f; }

typedef int (*emit_fn)(void *ctx, const char *name, dsi_dtype dt, int n_dims, const int64_t *shape, const void *data);

/* The value the (i+1)-th unif(&s) call returns when s starts at st: splitmix
 * is a counter, so threads can each generate their own stretch of a tensor
 * and the result is the same as one sequential pass. */
static float unif_at(uint64_t st, size_t i) {
    uint64_t s = st + (uint64_t)i * 0x9e3779b97f4a7c15ull;
    return unif(&s);
}

typedef struct gen {
    dsi_pool *pool;        /* NULL: one thread */
    const dsi_config *c;
    uint64_t seed;
    emit_fn emit;
    void *ctx;
    float *fbuf;
    void *obuf;
    float *sbuf;
    size_t cap;
} gen;

static uint64_t name_seed(uint64_t seed, const char *name) {
    uint64_t h = seed ^ 0x51ed270b27a3a5c9ull;
    for (const char *p = name; *p; p++) h = (h ^ (uint8_t)*p) * 1099511628211ull;
    return h;
}

typedef struct lin_job {
    gen *g;
    uint64_t st;
    int rows, cols, br, bc, sc;
    float a;
} lin_job;

/* Rows [b*br, (b+1)*br) of a linear weight: generated, then BF16 or FP8 with
 * one scale per br x bc block (br = 1 for BF16: any row split will do). */
static void lin_rows_task(void *ctx, int64_t b0, int64_t b1, int tid) {
    const lin_job *j = ctx;
    gen *g = j->g;
    (void)tid;
    for (int64_t bi = b0; bi < b1; bi++) {
        int r0 = (int)bi * j->br, r1 = DSI_MIN(j->rows, r0 + j->br);
        for (size_t i = (size_t)r0 * j->cols; i < (size_t)r1 * j->cols; i++) g->fbuf[i] = unif_at(j->st, i) * j->a;
        if (!g->c->fp8) {
            uint16_t *o = g->obuf;
            for (size_t i = (size_t)r0 * j->cols; i < (size_t)r1 * j->cols; i++) o[i] = dsi_f32_to_bf16(g->fbuf[i]);
            continue;
        }
        uint8_t *o = g->obuf;
        for (int bj = 0; bj < j->sc; bj++) {
            int c0 = bj * j->bc, c1 = DSI_MIN(j->cols, c0 + j->bc);
            float amax = 0;
            for (int r = r0; r < r1; r++)
                for (int cc = c0; cc < c1; cc++) { /* values are finite: a compare, not a libm fmaxf call */
                    float v = fabsf(g->fbuf[(size_t)r * j->cols + cc]);
                    amax = v > amax ? v : amax;
                }
            float s = amax > 0 ? amax / 448.0f : 1.0f;
            g->sbuf[bi * j->sc + bj] = s;
            for (int r = r0; r < r1; r++)
                for (int cc = c0; cc < c1; cc++)
                    o[(size_t)r * j->cols + cc] = dsi_f32_to_e4m3(g->fbuf[(size_t)r * j->cols + cc] / s);
        }
    }
}

/* A linear weight [rows, cols]: FP8 + scale_inv or BF16. */
static int gen_linear(gen *g, const char *name, int rows, int cols) {
    lin_job j = {g, name_seed(g->seed, name), rows, cols, 1, cols, 1, sqrtf(3.0f / cols)}; /* std 1/sqrt(fan_in) */
    if (g->c->fp8) {
        j.br = g->c->weight_block[0];
        j.bc = g->c->weight_block[1];
        j.sc = DSI_CEIL_DIV(cols, j.bc);
    }
    int sr = DSI_CEIL_DIV(rows, j.br);
    dsi_pool_for(g->pool, sr, 1, lin_rows_task, &j);
    int64_t shape[2] = {rows, cols};
    if (!g->c->fp8) return g->emit(g->ctx, name, DSI_BF16, 2, shape, g->obuf);
    int rc = g->emit(g->ctx, name, DSI_F8_E4M3, 2, shape, g->obuf);
    if (rc) return rc;
    char sn[512];
    snprintf(sn, sizeof sn, "%s_scale_inv", name);
    int64_t sshape[2] = {sr, j.sc};
    return g->emit(g->ctx, sn, DSI_F32, 2, sshape, g->sbuf);
}

typedef struct bf16_job {
    uint16_t *o;
    uint64_t st;
    float a;
} bf16_job;

static void bf16_task(void *ctx, int64_t b, int64_t e, int tid) {
    const bf16_job *j = ctx;
    (void)tid;
    for (int64_t i = b; i < e; i++) j->o[i] = dsi_f32_to_bf16(unif_at(j->st, (size_t)i) * j->a);
}

/* BF16 matrix (embedding, lm_head, router) with the given std. */
static int gen_bf16(gen *g, const char *name, int rows, int cols, float std) {
    bf16_job j = {g->obuf, name_seed(g->seed, name), std * sqrtf(3.0f)};
    dsi_pool_for(g->pool, (int64_t)rows * cols, 4096, bf16_task, &j);
    int64_t shape[2] = {rows, cols};
    return g->emit(g->ctx, name, DSI_BF16, 2, shape, g->obuf);
}

/* Vector: norms near 1 (BF16), router bias small (F32). */
static int gen_vec(gen *g, const char *name, int n, float center, float spread, dsi_dtype dt) {
    uint64_t st = name_seed(g->seed, name);
    int64_t shape[1] = {n};
    if (dt == DSI_F32) {
        for (int i = 0; i < n; i++) g->fbuf[i] = center + spread * unif(&st);
        return g->emit(g->ctx, name, DSI_F32, 1, shape, g->fbuf);
    }
    uint16_t *o = g->obuf;
    for (int i = 0; i < n; i++) o[i] = dsi_f32_to_bf16(center + spread * unif(&st));
    return g->emit(g->ctx, name, DSI_BF16, 1, shape, o);
}

static int generate(const dsi_config *c, uint64_t seed, emit_fn emit, void *ctx, int progress) {
    int H = c->n_heads, qk = c->qk_nope_dim + c->qk_rope_dim;
    /* Every matrix generated, as [rows, cols]: the buffers must hold the
     * largest one (and its scales), whatever the config's proportions. */
    size_t shapes[][2] = {{c->vocab_size, c->hidden}, {c->dense_inter, c->hidden}, {c->hidden, c->dense_inter},
                          {c->q_lora_rank, c->hidden}, {(size_t)H * qk, c->q_lora_rank}, {(size_t)H * qk, c->hidden},
                          {c->kv_lora_rank + c->qk_rope_dim, c->hidden},
                          {(size_t)H * (c->qk_nope_dim + c->v_head_dim), c->kv_lora_rank},
                          {c->hidden, (size_t)H * c->v_head_dim}, {c->n_experts, c->hidden},
                          {(size_t)c->moe_inter * DSI_MAX(1, c->n_shared_experts), c->hidden},
                          {c->hidden, (size_t)c->moe_inter * DSI_MAX(1, c->n_shared_experts)}};
    size_t maxel = 1, max_scales = 1;
    size_t br = c->weight_block[0] > 0 ? c->weight_block[0] : 128, bc = c->weight_block[1] > 0 ? c->weight_block[1] : 128;
    for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++) {
        maxel = DSI_MAX(maxel, shapes[i][0] * shapes[i][1]);
        /* a fixed maxel/64 here overflowed for blocks smaller than 128x128 */
        max_scales = DSI_MAX(max_scales, DSI_CEIL_DIV(shapes[i][0], br) * DSI_CEIL_DIV(shapes[i][1], bc));
    }
    /* all cores: a DeepSeek-V3-width layer is 11 GB of weights */
    gen g = {dsi_pool_create(0), c, seed, emit, ctx, malloc(maxel * 4), malloc(maxel * 2), malloc(max_scales * 4), maxel};
    int rc = DSI_OK;
    if (!g.fbuf || !g.obuf || !g.sbuf) { rc = dsi_error(DSI_ENOMEM, "make-model: out of memory"); goto out; }
    char n[256];
#define NM(...) (snprintf(n, sizeof n, __VA_ARGS__), n)
#define G(x) do { if ((rc = (x)) != DSI_OK) goto out; } while (0)
    G(gen_bf16(&g, "model.embed_tokens.weight", c->vocab_size, c->hidden, 1.0f));
    for (int l = 0; l < c->n_layers; l++) {
        if (progress) fprintf(stderr, "\rmake-model: layer %d/%d", l + 1, c->n_layers);
        G(gen_vec(&g, NM("model.layers.%d.input_layernorm.weight", l), c->hidden, 1.0f, 0.1f, DSI_BF16));
        G(gen_vec(&g, NM("model.layers.%d.post_attention_layernorm.weight", l), c->hidden, 1.0f, 0.1f, DSI_BF16));
        if (c->q_lora_rank > 0) {
            G(gen_linear(&g, NM("model.layers.%d.self_attn.q_a_proj.weight", l), c->q_lora_rank, c->hidden));
            G(gen_vec(&g, NM("model.layers.%d.self_attn.q_a_layernorm.weight", l), c->q_lora_rank, 1.0f, 0.1f, DSI_BF16));
            G(gen_linear(&g, NM("model.layers.%d.self_attn.q_b_proj.weight", l), H * qk, c->q_lora_rank));
        } else {
            G(gen_linear(&g, NM("model.layers.%d.self_attn.q_proj.weight", l), H * qk, c->hidden));
        }
        G(gen_linear(&g, NM("model.layers.%d.self_attn.kv_a_proj_with_mqa.weight", l), c->kv_lora_rank + c->qk_rope_dim, c->hidden));
        G(gen_vec(&g, NM("model.layers.%d.self_attn.kv_a_layernorm.weight", l), c->kv_lora_rank, 1.0f, 0.1f, DSI_BF16));
        G(gen_linear(&g, NM("model.layers.%d.self_attn.kv_b_proj.weight", l), H * (c->qk_nope_dim + c->v_head_dim), c->kv_lora_rank));
        G(gen_linear(&g, NM("model.layers.%d.self_attn.o_proj.weight", l), c->hidden, H * c->v_head_dim));
        if (!dsi_config_is_moe_layer(c, l)) {
            G(gen_linear(&g, NM("model.layers.%d.mlp.gate_proj.weight", l), c->dense_inter, c->hidden));
            G(gen_linear(&g, NM("model.layers.%d.mlp.up_proj.weight", l), c->dense_inter, c->hidden));
            G(gen_linear(&g, NM("model.layers.%d.mlp.down_proj.weight", l), c->hidden, c->dense_inter));
            continue;
        }
        G(gen_bf16(&g, NM("model.layers.%d.mlp.gate.weight", l), c->n_experts, c->hidden, 1.0f / sqrtf((float)c->hidden)));
        G(gen_vec(&g, NM("model.layers.%d.mlp.gate.e_score_correction_bias", l), c->n_experts, 0.0f, 0.05f, DSI_F32));
        for (int x = 0; x < c->n_experts; x++) {
            G(gen_linear(&g, NM("model.layers.%d.mlp.experts.%d.gate_proj.weight", l, x), c->moe_inter, c->hidden));
            G(gen_linear(&g, NM("model.layers.%d.mlp.experts.%d.up_proj.weight", l, x), c->moe_inter, c->hidden));
            G(gen_linear(&g, NM("model.layers.%d.mlp.experts.%d.down_proj.weight", l, x), c->hidden, c->moe_inter));
        }
        if (c->n_shared_experts > 0) {
            int si = c->moe_inter * c->n_shared_experts;
            G(gen_linear(&g, NM("model.layers.%d.mlp.shared_experts.gate_proj.weight", l), si, c->hidden));
            G(gen_linear(&g, NM("model.layers.%d.mlp.shared_experts.up_proj.weight", l), si, c->hidden));
            G(gen_linear(&g, NM("model.layers.%d.mlp.shared_experts.down_proj.weight", l), c->hidden, si));
        }
    }
    if (progress) fputc('\n', stderr);
    G(gen_vec(&g, "model.norm.weight", c->hidden, 1.0f, 0.1f, DSI_BF16));
    if (!c->tie_word_embeddings) G(gen_bf16(&g, "lm_head.weight", c->vocab_size, c->hidden, 1.0f / sqrtf((float)c->hidden)));
out:
    dsi_pool_destroy(g.pool);
    free(g.fbuf);
    free(g.obuf);
    free(g.sbuf);
    return rc;
#undef NM
#undef G
}

/* ---- writing a sharded directory ---- */

typedef struct dir_ctx {
    const char *dir;
    size_t shard_bytes;
    dsi_st_writer *w;
    int shard;            /* index of the shard being filled (0-based) */
    char **names;         /* tensor name -> shard index, for the index file */
    int *shard_of;
    int n, cap;
    char **tmp_paths;     /* shard files written under temporary numbering */
    int n_tmp;
} dir_ctx;

static int flush_shard(dir_ctx *d) {
    if (!d->w || dsi_st_writer_count(d->w) == 0) return DSI_OK;
    char path[4096];
    snprintf(path, sizeof path, "%s/.shard-%05d.safetensors", d->dir, d->shard);
    int rc = dsi_st_writer_save(d->w, path);
    dsi_st_writer_destroy(d->w);
    d->w = NULL;
    if (rc) return rc;
    d->tmp_paths = realloc(d->tmp_paths, sizeof(char *) * (d->n_tmp + 1));
    d->tmp_paths[d->n_tmp++] = strdup(path);
    d->shard++;
    return DSI_OK;
}

static int dir_emit(void *ctx, const char *name, dsi_dtype dt, int nd, const int64_t *shape, const void *data) {
    dir_ctx *d = ctx;
    size_t bytes = dsi_dtype_size(dt);
    for (int i = 0; i < nd; i++) bytes *= (size_t)shape[i];
    /* keep a weight and its scale in the same shard: only split before a weight */
    int is_scale = strstr(name, "_scale_inv") != NULL;
    if (d->w && !is_scale && dsi_st_writer_bytes(d->w) + bytes > d->shard_bytes) {
        int rc = flush_shard(d);
        if (rc) return rc;
    }
    if (!d->w && !(d->w = dsi_st_writer_create())) return dsi_error(DSI_ENOMEM, "out of memory");
    int rc = dsi_st_writer_add(d->w, name, dt, nd, shape, data);
    if (rc) return rc;
    if (d->n == d->cap) {
        d->cap = d->cap ? d->cap * 2 : 1024;
        d->names = realloc(d->names, sizeof(char *) * d->cap);
        d->shard_of = realloc(d->shard_of, sizeof(int) * d->cap);
    }
    d->names[d->n] = strdup(name);
    d->shard_of[d->n++] = d->shard;
    return DSI_OK;
}

int dsi_make_model(const dsi_config *c, const char *dir, uint64_t seed, size_t shard_bytes, int progress) {
    int rc = dsi_config_validate(c);
    if (rc) return rc;
    if (mkdir(dir, 0755) != 0 && errno != EEXIST) return dsi_error(DSI_EIO, "%s: %s", dir, strerror(errno));
    dir_ctx d = {.dir = dir, .shard_bytes = shard_bytes ? shard_bytes : (size_t)4 << 30};
    rc = generate(c, seed, dir_emit, &d, progress);
    if (!rc) rc = flush_shard(&d);
    char path[4096], final[4096];
    if (!rc) {
        /* final names model-0000i-of-0000N.safetensors and the index */
        int N = d.n_tmp;
        FILE *f = NULL;
        for (int i = 0; i < N && !rc; i++) {
            snprintf(final, sizeof final, "%s/model-%05d-of-%05d.safetensors", dir, i + 1, N);
            if (rename(d.tmp_paths[i], final) != 0) rc = dsi_error(DSI_EIO, "%s: %s", final, strerror(errno));
        }
        snprintf(path, sizeof path, "%s/model.safetensors.index.json", dir);
        if (!rc && !(f = fopen(path, "w"))) rc = dsi_error(DSI_EIO, "%s: %s", path, strerror(errno));
        if (!rc) {
            fprintf(f, "{\n  \"metadata\": {\"generator\": \"dsinfer make-model\", \"seed\": %llu},\n  \"weight_map\": {\n",
                    (unsigned long long)seed);
            for (int i = 0; i < d.n; i++)
                fprintf(f, "    \"%s\": \"model-%05d-of-%05d.safetensors\"%s\n", d.names[i], d.shard_of[i] + 1, N,
                        i + 1 < d.n ? "," : "");
            fprintf(f, "  }\n}\n");
            if (fclose(f) != 0) rc = dsi_error(DSI_EIO, "%s: write failed", path);
        }
        snprintf(path, sizeof path, "%s/config.json", dir);
        char *js = rc ? NULL : dsi_config_to_json(c);
        if (js) {
            FILE *cf = fopen(path, "w");
            if (!cf || fputs(js, cf) < 0 || fclose(cf) != 0) rc = dsi_error(DSI_EIO, "%s: write failed", path);
            free(js);
        }
    }
    dsi_st_writer_destroy(d.w);
    for (int i = 0; i < d.n; i++) free(d.names[i]);
    for (int i = 0; i < d.n_tmp; i++) free(d.tmp_paths[i]);
    free(d.names);
    free(d.shard_of);
    free(d.tmp_paths);
    return rc;
}

static int mem_emit(void *ctx, const char *name, dsi_dtype dt, int nd, const int64_t *shape, const void *data) {
    return dsi_st_writer_add(ctx, name, dt, nd, shape, data);
}

int dsi_make_model_memory(const dsi_config *c, uint64_t seed, dsi_model **out) {
    *out = NULL;
    int rc = dsi_config_validate(c);
    if (rc) return rc;
    dsi_st_writer *w = dsi_st_writer_create();
    if (!w) return dsi_error(DSI_ENOMEM, "out of memory");
    rc = generate(c, seed, mem_emit, w, 0);
    void *buf = NULL;
    size_t len = 0;
    if (!rc) rc = dsi_st_writer_serialize(w, &buf, &len);
    dsi_st_writer_destroy(w);
    if (rc) return rc;
    dsi_st_set *set;
    rc = dsi_st_open_memory(buf, len, "<built-in demo model>", &set);
    if (rc) { free(buf); return rc; }
    rc = dsi_model_from_set(c, set, "dsinfer-demo", out);
    if (rc) { free(buf); return rc; }
    (*out)->image = buf;
    return DSI_OK;
}
