/* config.json parsing and validation for deepseek_v3 checkpoints. */
#include "dsinfer/model.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

/* `key` of object `obj` (NULL when absent). A key given twice is an error:
 * cJSON would read the first value and Python's json, which transformers
 * reads config.json with, the last. */
static int field(const cJSON *obj, const char *key, const cJSON **out) {
    *out = NULL;
    for (const cJSON *e = obj->child; e; e = e->next) {
        if (!e->string || strcmp(e->string, key)) continue;
        if (*out) return dsi_error(DSI_EFORMAT, "config.json: field '%s' appears more than once", key);
        *out = e;
    }
    return DSI_OK;
}

/* Reads an integer field; `def` when absent or null. Errors on wrong type. */
static int get_int(const cJSON *root, const char *key, int def, int *out, int required) {
    const cJSON *v;
    if (field(root, key, &v)) return DSI_EFORMAT;
    if (!v || cJSON_IsNull(v)) {
        if (required) return dsi_error(DSI_EFORMAT, "config.json: missing required field '%s'", key);
        *out = def;
        return DSI_OK;
    }
    if (!cJSON_IsNumber(v) || v->valuedouble != floor(v->valuedouble))
        return dsi_error(DSI_EFORMAT, "config.json: field '%s' must be an integer", key);
    if (fabs(v->valuedouble) > 1e9)
        return dsi_error(DSI_EFORMAT, "config.json: field '%s' is out of range (%g)", key, v->valuedouble);
    *out = (int)v->valuedouble;
    return DSI_OK;
}

/* eos_token_id: an integer, or a list of 1..DSI_MAX_EOS_IDS integers (as
 * transformers allows); 1 when absent. */
static int get_eos(const cJSON *root, dsi_config *c) {
    const cJSON *v;
    if (field(root, "eos_token_id", &v)) return DSI_EFORMAT;
    if (!cJSON_IsArray(v)) {
        int rc = get_int(root, "eos_token_id", 1, &c->eos_token_id, 0);
        c->eos_token_ids[0] = c->eos_token_id;
        c->n_eos_token_ids = 1;
        return rc;
    }
    int n = cJSON_GetArraySize(v);
    if (n < 1 || n > DSI_MAX_EOS_IDS)
        return dsi_error(DSI_EFORMAT, "config.json: field 'eos_token_id' must list 1 to %d ids (has %d)",
                         DSI_MAX_EOS_IDS, n);
    int i = 0;
    for (const cJSON *e = v->child; e; e = e->next, i++) {
        if (!cJSON_IsNumber(e) || e->valuedouble != floor(e->valuedouble) || fabs(e->valuedouble) > 1e9)
            return dsi_error(DSI_EFORMAT, "config.json: field 'eos_token_id' element %d must be an integer", i);
        c->eos_token_ids[i] = (int)e->valuedouble;
    }
    c->n_eos_token_ids = n;
    c->eos_token_id = c->eos_token_ids[0];
    return DSI_OK;
}

static int get_num(const cJSON *root, const char *key, double def, double *out) {
    const cJSON *v;
    if (field(root, key, &v)) return DSI_EFORMAT;
    if (!v || cJSON_IsNull(v)) { *out = def; return DSI_OK; }
    if (!cJSON_IsNumber(v) || !isfinite(v->valuedouble))
        return dsi_error(DSI_EFORMAT, "config.json: field '%s' must be a number", key);
    *out = v->valuedouble;
    return DSI_OK;
}

static int get_bool(const cJSON *root, const char *key, int def, int *out) {
    const cJSON *v;
    if (field(root, key, &v)) return DSI_EFORMAT;
    if (!v || cJSON_IsNull(v)) { *out = def; return DSI_OK; }
    if (!cJSON_IsBool(v)) return dsi_error(DSI_EFORMAT, "config.json: field '%s' must be true or false", key);
    *out = cJSON_IsTrue(v);
    return DSI_OK;
}

/* A string field: *out = NULL when absent or null. Any other type is an error:
 * a mistyped scoring_func must not silently mean "the default". */
static int get_str(const cJSON *root, const char *key, const char **out) {
    const cJSON *v;
    *out = NULL;
    if (field(root, key, &v)) return DSI_EFORMAT;
    if (!v || cJSON_IsNull(v)) return DSI_OK;
    if (!cJSON_IsString(v)) return dsi_error(DSI_EFORMAT, "config.json: field '%s' must be a string", key);
    *out = v->valuestring;
    return DSI_OK;
}

#define TRY(x) do { int rc_ = (x); if (rc_ != DSI_OK) { cJSON_Delete(root); return rc_; } } while (0)
/* The message is formatted before the tree is freed: it quotes strings that live in it. */
#define FAIL(code, ...) do { int rc_ = dsi_error(code, __VA_ARGS__); cJSON_Delete(root); return rc_; } while (0)

int dsi_config_parse(const char *json, size_t len, dsi_config *c) {
    memset(c, 0, sizeof *c);
    /* cJSON skips a NUL as whitespace; Python's json refuses it */
    const char *nul = memchr(json, 0, len);
    if (nul) return dsi_error(DSI_EFORMAT, "config.json: NUL byte at offset %zu", (size_t)(nul - json));
    const char *end = NULL;
    cJSON *root = cJSON_ParseWithLengthOpts(json, len, &end, 0);
    if (!root || !cJSON_IsObject(root)) FAIL(DSI_EFORMAT, "config.json: not a JSON object");
    /* only whitespace may follow the object (Python's json.load refuses the rest) */
    for (const char *p = end; p < json + len; p++)
        if (*p != ' ' && *p != '\t' && *p != '\n' && *p != '\r')
            FAIL(DSI_EFORMAT, "config.json: junk after the JSON object (byte %zu)", (size_t)(p - json));
    const char *mt, *sf, *tm, *act;
    TRY(get_str(root, "model_type", &mt));
    if (!mt) FAIL(DSI_EFORMAT, "config.json: missing 'model_type'");
    if (strcmp(mt, "deepseek_v3") && strcmp(mt, "kimi_k2"))
        FAIL(DSI_EUNSUPPORTED, "config.json: model_type '%s' is not supported (deepseek_v3 only)", mt);

    TRY(get_int(root, "vocab_size", 0, &c->vocab_size, 1));
    TRY(get_int(root, "hidden_size", 0, &c->hidden, 1));
    TRY(get_int(root, "num_hidden_layers", 0, &c->n_layers, 1));
    TRY(get_int(root, "intermediate_size", 0, &c->dense_inter, 1));
    TRY(get_int(root, "moe_intermediate_size", 0, &c->moe_inter, 0));
    TRY(get_int(root, "first_k_dense_replace", 0, &c->first_k_dense, 0));
    TRY(get_int(root, "moe_layer_freq", 1, &c->moe_layer_freq, 0));
    TRY(get_int(root, "num_attention_heads", 0, &c->n_heads, 1));
    TRY(get_int(root, "q_lora_rank", 0, &c->q_lora_rank, 0));
    TRY(get_int(root, "kv_lora_rank", 0, &c->kv_lora_rank, 1));
    TRY(get_int(root, "qk_nope_head_dim", 0, &c->qk_nope_dim, 1));
    TRY(get_int(root, "qk_rope_head_dim", 0, &c->qk_rope_dim, 1));
    TRY(get_int(root, "v_head_dim", 0, &c->v_head_dim, 1));
    TRY(get_int(root, "n_routed_experts", 0, &c->n_experts, 0));
    TRY(get_int(root, "num_experts_per_tok", 0, &c->n_experts_per_tok, 0));
    TRY(get_int(root, "n_group", 1, &c->n_group, 0));
    TRY(get_int(root, "topk_group", 1, &c->topk_group, 0));
    TRY(get_int(root, "n_shared_experts", 0, &c->n_shared_experts, 0));
    TRY(get_bool(root, "norm_topk_prob", 1, &c->norm_topk_prob));
    double rsf;
    TRY(get_num(root, "routed_scaling_factor", 1.0, &rsf));
    c->routed_scaling_factor = (float)rsf;
    TRY(get_num(root, "rms_norm_eps", 1e-6, &c->rms_norm_eps));
    TRY(get_num(root, "rope_theta", 10000.0, &c->rope_theta));
    TRY(get_bool(root, "rope_interleave", 1, &c->rope_interleave));
    TRY(get_int(root, "max_position_embeddings", 4096, &c->max_position_embeddings, 0));
    TRY(get_int(root, "num_nextn_predict_layers", 0, &c->n_nextn_layers, 0));
    TRY(get_int(root, "bos_token_id", 0, &c->bos_token_id, 0));
    TRY(get_eos(root, c));
    TRY(get_bool(root, "tie_word_embeddings", 0, &c->tie_word_embeddings));
    int attention_bias;
    TRY(get_bool(root, "attention_bias", 0, &attention_bias));
    if (attention_bias) FAIL(DSI_EUNSUPPORTED, "config.json: attention_bias=true is not supported");

    TRY(get_str(root, "scoring_func", &sf));
    if (sf && strcmp(sf, "sigmoid"))
        FAIL(DSI_EUNSUPPORTED, "config.json: scoring_func '%s' is not supported (sigmoid only)", sf);
    TRY(get_str(root, "topk_method", &tm));
    if (tm && strcmp(tm, "noaux_tc"))
        FAIL(DSI_EUNSUPPORTED, "config.json: topk_method '%s' is not supported (noaux_tc only)", tm);
    c->use_correction_bias = 1;
    TRY(get_str(root, "hidden_act", &act));
    if (act && strcmp(act, "silu")) FAIL(DSI_EUNSUPPORTED, "config.json: hidden_act '%s' is not supported (silu only)", act);

    const cJSON *rs;
    TRY(field(root, "rope_scaling", &rs));
    if (rs && !cJSON_IsNull(rs)) {
        if (!cJSON_IsObject(rs)) FAIL(DSI_EFORMAT, "config.json: rope_scaling must be an object or null");
        const char *t, *rt;
        TRY(get_str(rs, "type", &t));
        TRY(get_str(rs, "rope_type", &rt));
        /* transformers reads rope_type first, DeepSeek's own code 'type': both must agree */
        if (t && rt && strcmp(t, rt))
            FAIL(DSI_EFORMAT, "config.json: rope_scaling.type '%s' and rope_scaling.rope_type '%s' disagree", t, rt);
        if (!t) t = rt;
        if (!t || strcmp(t, "yarn"))
            FAIL(DSI_EUNSUPPORTED, "config.json: rope_scaling type '%s' is not supported (yarn only)", t ? t : "(none)");
        c->yarn = 1;
        TRY(get_num(rs, "factor", 1.0, &c->yarn_factor));
        double omp;
        TRY(get_num(rs, "original_max_position_embeddings", 4096, &omp));
        c->yarn_orig_max_pos = omp;
        TRY(get_num(rs, "beta_fast", 32, &c->yarn_beta_fast));
        TRY(get_num(rs, "beta_slow", 1, &c->yarn_beta_slow));
        TRY(get_num(rs, "mscale", 1, &c->yarn_mscale));
        TRY(get_num(rs, "mscale_all_dim", 0, &c->yarn_mscale_all_dim));
    }

    const cJSON *q;
    TRY(field(root, "quantization_config", &q));
    c->weight_block[0] = c->weight_block[1] = 128;
    if (q && !cJSON_IsNull(q)) {
        if (!cJSON_IsObject(q)) FAIL(DSI_EFORMAT, "config.json: quantization_config must be an object or null");
        const char *qm, *fmt, *as;
        TRY(get_str(q, "quant_method", &qm));
        TRY(get_str(q, "fmt", &fmt));
        TRY(get_str(q, "activation_scheme", &as));
        if (!qm || strcmp(qm, "fp8"))
            FAIL(DSI_EUNSUPPORTED, "config.json: quantization_config.quant_method '%s' is not supported (fp8 only)",
                 qm ? qm : "(none)");
        if (fmt && strcmp(fmt, "e4m3"))
            FAIL(DSI_EUNSUPPORTED, "config.json: quantization_config.fmt '%s' is not supported (e4m3 only)", fmt);
        /* activations are quantised on the fly; a static scheme's input scales would go unused */
        if (as && strcmp(as, "dynamic"))
            FAIL(DSI_EUNSUPPORTED,
                 "config.json: quantization_config.activation_scheme '%s' is not supported (dynamic only)", as);
        const cJSON *bs;
        TRY(field(q, "weight_block_size", &bs));
        if (bs) {
            if (!cJSON_IsArray(bs) || cJSON_GetArraySize(bs) != 2)
                FAIL(DSI_EFORMAT, "config.json: quantization_config.weight_block_size must be [rows, cols]");
            for (int k = 0; k < 2; k++) {
                /* valueint would truncate 127.5 and saturate 1e300 */
                const cJSON *x = cJSON_GetArrayItem(bs, k);
                if (!cJSON_IsNumber(x) || x->valuedouble != floor(x->valuedouble) || x->valuedouble < 1 ||
                    x->valuedouble > 4096)
                    FAIL(DSI_EFORMAT, "config.json: quantization_config.weight_block_size must be two integers in [1, 4096]");
                c->weight_block[k] = (int)x->valuedouble;
            }
        }
        c->fp8 = 1;
    }
    cJSON_Delete(root);
    return dsi_config_validate(c);
}

int dsi_config_validate(const dsi_config *c) {
#define CHECK(cond, ...) do { if (!(cond)) return dsi_error(DSI_EFORMAT, "config: " __VA_ARGS__); } while (0)
    CHECK(c->vocab_size > 0 && c->vocab_size <= (1 << 24), "vocab_size %d out of range", c->vocab_size);
    CHECK(c->hidden > 0 && c->hidden <= 65536, "hidden_size %d out of range", c->hidden);
    CHECK(c->n_layers > 0 && c->n_layers <= 1024, "num_hidden_layers %d out of range", c->n_layers);
    CHECK(c->n_heads > 0 && c->n_heads <= 1024, "num_attention_heads %d out of range", c->n_heads);
    CHECK(c->kv_lora_rank > 0 && c->kv_lora_rank <= 65536, "kv_lora_rank out of range");
    CHECK(c->q_lora_rank >= 0 && c->q_lora_rank <= 65536, "q_lora_rank out of range");
    CHECK(c->qk_nope_dim > 0 && c->qk_nope_dim <= 4096, "qk_nope_head_dim out of range");
    CHECK(c->qk_rope_dim > 0 && c->qk_rope_dim <= 4096 && c->qk_rope_dim % 2 == 0,
          "qk_rope_head_dim must be positive and even");
    CHECK(c->v_head_dim > 0 && c->v_head_dim <= 4096, "v_head_dim out of range");
    CHECK(c->dense_inter > 0 && c->dense_inter <= (1 << 20), "intermediate_size out of range");
    CHECK(c->first_k_dense >= 0, "first_k_dense_replace must be >= 0");
    CHECK(c->moe_layer_freq >= 1, "moe_layer_freq must be >= 1");
    CHECK(c->rms_norm_eps > 0 && c->rms_norm_eps < 1, "rms_norm_eps out of range");
    /* log(rope_theta) divides in YaRN's ramp, and theta < 1 turns the frequencies around */
    CHECK(c->rope_theta > 1, "rope_theta %g must be > 1", c->rope_theta);
    if (c->yarn) {
        CHECK(c->yarn_factor >= 1, "rope_scaling.factor %g must be >= 1", c->yarn_factor);
        CHECK(c->yarn_orig_max_pos >= 1, "rope_scaling.original_max_position_embeddings %g must be >= 1",
              c->yarn_orig_max_pos);
        CHECK(c->yarn_beta_fast > 0, "rope_scaling.beta_fast %g must be > 0", c->yarn_beta_fast);
        CHECK(c->yarn_beta_slow > 0, "rope_scaling.beta_slow %g must be > 0", c->yarn_beta_slow);
        CHECK(c->yarn_mscale >= 0 && c->yarn_mscale <= 100, "rope_scaling.mscale %g out of range [0, 100]",
              c->yarn_mscale);
        CHECK(c->yarn_mscale_all_dim >= 0 && c->yarn_mscale_all_dim <= 100,
              "rope_scaling.mscale_all_dim %g out of range [0, 100]", c->yarn_mscale_all_dim);
    }
    {
        /* and the float32 constants every backend uses come out finite and positive */
        float inv_freq[2048], rope_mscale, softmax_scale;
        dsi_config_rope(c, inv_freq, &rope_mscale, &softmax_scale);
        int ok = isfinite(rope_mscale) && rope_mscale > 0 && isfinite(softmax_scale) && softmax_scale > 0;
        for (int i = 0; i < c->qk_rope_dim / 2; i++) ok = ok && isfinite(inv_freq[i]) && inv_freq[i] > 0;
        CHECK(ok, "rope_theta / rope_scaling give non-finite or non-positive rope constants");
    }
    CHECK(c->n_nextn_layers >= 0, "num_nextn_predict_layers must be >= 0");
    CHECK(c->max_position_embeddings > 0, "max_position_embeddings must be > 0");
    CHECK(c->n_experts >= 0, "n_routed_experts %d must be >= 0", c->n_experts);
    if (c->n_experts > 0) {
        CHECK(c->n_experts <= 4096, "n_routed_experts out of range");
        CHECK(c->moe_inter > 0 && c->moe_inter <= (1 << 20), "moe_intermediate_size out of range");
        CHECK(c->n_group >= 1 && c->n_experts % c->n_group == 0, "n_routed_experts %d not divisible by n_group %d",
              c->n_experts, c->n_group);
        CHECK(c->topk_group >= 1 && c->topk_group <= c->n_group, "topk_group %d must be in [1, n_group %d]",
              c->topk_group, c->n_group);
        CHECK(c->n_experts_per_tok >= 1 && c->n_experts_per_tok <= c->topk_group * (c->n_experts / c->n_group),
              "num_experts_per_tok %d exceeds the experts in the kept groups", c->n_experts_per_tok);
        CHECK(c->n_shared_experts >= 0 && c->n_shared_experts <= 64, "n_shared_experts out of range");
        /* a float: a double past FLT_MAX is +inf here */
        CHECK(isfinite(c->routed_scaling_factor) && c->routed_scaling_factor > 0,
              "routed_scaling_factor %g must be positive and finite as a float32", (double)c->routed_scaling_factor);
    }
    CHECK(c->bos_token_id >= -1 && c->bos_token_id < c->vocab_size, "bos_token_id out of range");
    CHECK(c->eos_token_id >= -1 && c->eos_token_id < c->vocab_size, "eos_token_id out of range");
    CHECK(c->n_eos_token_ids >= 0 && c->n_eos_token_ids <= DSI_MAX_EOS_IDS, "eos_token_id: bad list length");
    for (int i = 0; i < c->n_eos_token_ids; i++)
        CHECK(c->eos_token_ids[i] >= -1 && c->eos_token_ids[i] < c->vocab_size, "eos_token_id %d out of range",
              c->eos_token_ids[i]);
    return DSI_OK;
#undef CHECK
}

int dsi_config_load(const char *path, dsi_config *out) {
    struct stat st;
    if (stat(path, &st) == 0) {
        if (!S_ISREG(st.st_mode)) /* a FIFO would block fopen */
            return dsi_error(DSI_EIO, "%s: not a regular file", path);
        if (st.st_size >= (1 << 20)) /* it would be cut short, then "not a JSON object" */
            return dsi_error(DSI_EFORMAT, "%s: %lld bytes, over the 1 MiB a config.json may have", path,
                             (long long)st.st_size);
    }
    FILE *f = fopen(path, "rb");
    if (!f) return dsi_error(errno == ENOENT ? DSI_ENOTFOUND : DSI_EIO, "%s: %s", path, strerror(errno));
    char *buf = malloc(1 << 20);
    size_t n = buf ? fread(buf, 1, (1 << 20) - 1, f) : 0;
    fclose(f);
    if (!buf) return dsi_error(DSI_ENOMEM, "out of memory");
    int rc = dsi_config_parse(buf, n, out);
    free(buf);
    if (rc != DSI_OK) dsi_error_prefix(rc, "%s", path);
    return rc;
}

char *dsi_config_to_json(const dsi_config *c) {
    cJSON *r = cJSON_CreateObject();
    cJSON *arch = cJSON_AddArrayToObject(r, "architectures");
    cJSON_AddItemToArray(arch, cJSON_CreateString("DeepseekV3ForCausalLM"));
    cJSON_AddStringToObject(r, "model_type", "deepseek_v3");
    cJSON_AddNumberToObject(r, "vocab_size", c->vocab_size);
    cJSON_AddNumberToObject(r, "hidden_size", c->hidden);
    cJSON_AddNumberToObject(r, "intermediate_size", c->dense_inter);
    cJSON_AddNumberToObject(r, "moe_intermediate_size", c->moe_inter);
    cJSON_AddNumberToObject(r, "num_hidden_layers", c->n_layers);
    cJSON_AddNumberToObject(r, "first_k_dense_replace", c->first_k_dense);
    cJSON_AddNumberToObject(r, "moe_layer_freq", c->moe_layer_freq);
    cJSON_AddNumberToObject(r, "num_attention_heads", c->n_heads);
    cJSON_AddNumberToObject(r, "num_key_value_heads", c->n_heads);
    if (c->q_lora_rank) cJSON_AddNumberToObject(r, "q_lora_rank", c->q_lora_rank);
    else cJSON_AddNullToObject(r, "q_lora_rank");
    cJSON_AddNumberToObject(r, "kv_lora_rank", c->kv_lora_rank);
    cJSON_AddNumberToObject(r, "qk_rope_head_dim", c->qk_rope_dim);
    cJSON_AddNumberToObject(r, "qk_nope_head_dim", c->qk_nope_dim);
    cJSON_AddNumberToObject(r, "v_head_dim", c->v_head_dim);
    cJSON_AddNumberToObject(r, "n_routed_experts", c->n_experts);
    cJSON_AddNumberToObject(r, "num_experts_per_tok", c->n_experts_per_tok);
    cJSON_AddNumberToObject(r, "n_group", c->n_group);
    cJSON_AddNumberToObject(r, "topk_group", c->topk_group);
    cJSON_AddNumberToObject(r, "n_shared_experts", c->n_shared_experts);
    cJSON_AddNumberToObject(r, "routed_scaling_factor", c->routed_scaling_factor);
    cJSON_AddBoolToObject(r, "norm_topk_prob", c->norm_topk_prob);
    cJSON_AddStringToObject(r, "scoring_func", "sigmoid");
    cJSON_AddStringToObject(r, "topk_method", "noaux_tc");
    cJSON_AddStringToObject(r, "hidden_act", "silu");
    cJSON_AddNumberToObject(r, "max_position_embeddings", c->max_position_embeddings);
    cJSON_AddNumberToObject(r, "rms_norm_eps", c->rms_norm_eps);
    cJSON_AddNumberToObject(r, "rope_theta", c->rope_theta);
    cJSON_AddBoolToObject(r, "rope_interleave", c->rope_interleave); /* the engine reads it */
    if (c->yarn) {
        cJSON *y = cJSON_AddObjectToObject(r, "rope_scaling");
        cJSON_AddStringToObject(y, "type", "yarn");
        cJSON_AddStringToObject(y, "rope_type", "yarn");
        cJSON_AddNumberToObject(y, "factor", c->yarn_factor);
        cJSON_AddNumberToObject(y, "original_max_position_embeddings", c->yarn_orig_max_pos);
        cJSON_AddNumberToObject(y, "beta_fast", c->yarn_beta_fast);
        cJSON_AddNumberToObject(y, "beta_slow", c->yarn_beta_slow);
        cJSON_AddNumberToObject(y, "mscale", c->yarn_mscale);
        cJSON_AddNumberToObject(y, "mscale_all_dim", c->yarn_mscale_all_dim);
    } else {
        cJSON_AddNullToObject(r, "rope_scaling");
    }
    cJSON_AddBoolToObject(r, "attention_bias", 0);
    cJSON_AddBoolToObject(r, "tie_word_embeddings", c->tie_word_embeddings);
    cJSON_AddNumberToObject(r, "bos_token_id", c->bos_token_id);
    if (c->n_eos_token_ids > 1) {
        cJSON *a = cJSON_AddArrayToObject(r, "eos_token_id");
        for (int i = 0; i < c->n_eos_token_ids; i++) cJSON_AddItemToArray(a, cJSON_CreateNumber(c->eos_token_ids[i]));
    } else {
        cJSON_AddNumberToObject(r, "eos_token_id", c->eos_token_id);
    }
    cJSON_AddNumberToObject(r, "num_nextn_predict_layers", c->n_nextn_layers);
    cJSON_AddStringToObject(r, "torch_dtype", "bfloat16");
    if (c->fp8) {
        cJSON *q = cJSON_AddObjectToObject(r, "quantization_config");
        cJSON_AddStringToObject(q, "activation_scheme", "dynamic");
        cJSON_AddStringToObject(q, "fmt", "e4m3");
        cJSON_AddStringToObject(q, "quant_method", "fp8");
        cJSON *b = cJSON_AddArrayToObject(q, "weight_block_size");
        cJSON_AddItemToArray(b, cJSON_CreateNumber(c->weight_block[0]));
        cJSON_AddItemToArray(b, cJSON_CreateNumber(c->weight_block[1]));
    }
    char *s = cJSON_Print(r);
    cJSON_Delete(r);
    return s;
}
