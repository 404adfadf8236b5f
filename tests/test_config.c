/* config.json parsing: the golden configs read field by field, every field
 * that changes the computation is honoured, unsupported values are
 * DSI_EUNSUPPORTED and mistyped ones DSI_EFORMAT (both naming the field),
 * inconsistent sizes are rejected, and dsi_config_to_json round-trips. */
#define _GNU_SOURCE
#include "test_util.h"

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>
#include <cjson/cJSON.h>
#include <math.h>

#include "dsinfer/model.h"

static char *golden_text(const char *model) {
    char path[1024];
    snprintf(path, sizeof path, "%s/golden/%s/config.json", DSI_TEST_DATA, model);
    size_t len = 0;
    char *buf = tu_read_file(path, &len);
    assert_non_null(buf);
    char *s = realloc(buf, len + 1);
    s[len] = 0;
    return s;
}

/* Parses golden `model`'s config.json with `path` ("a" or "a.b") set to the
 * JSON `value`, or removed when value is NULL. Returns dsi_config_parse's status. */
static int parse_with(const char *model, const char *path, const char *value, dsi_config *c) {
    char *text = golden_text(model);
    cJSON *root = cJSON_Parse(text);
    free(text);
    assert_non_null(root);
    if (path) {
        char key[128];
        snprintf(key, sizeof key, "%s", path);
        cJSON *parent = root;
        char *dot = strchr(key, '.');
        if (dot) {
            *dot = 0;
            parent = cJSON_GetObjectItemCaseSensitive(root, key);
            assert_true(cJSON_IsObject(parent));
        }
        const char *leaf = dot ? dot + 1 : key;
        cJSON_DeleteItemFromObjectCaseSensitive(parent, leaf);
        if (value) {
            cJSON *v = cJSON_Parse(value);
            assert_non_null(v);
            cJSON_AddItemToObject(parent, leaf, v);
        }
    }
    char *out = cJSON_PrintUnformatted(root);
    cJSON_Delete(root);
    int rc = dsi_config_parse(out, strlen(out), c);
    free(out);
    return rc;
}

static void test_golden_configs(void **state) {
    const char *models[] = {"tiny-fp8", "tiny-bf16"};
    for (int i = 0; i < 2; i++) {
        dsi_config c;
        int rc = parse_with(models[i], NULL, NULL, &c);
        if (rc) fprintf(stderr, "%s\n", dsi_last_error());
        assert_int_equal(rc, DSI_OK);
        assert_int_equal(c.vocab_size, 2048);
        assert_int_equal(c.hidden, 256);
        assert_int_equal(c.n_layers, 4);
        assert_int_equal(c.dense_inter, 512);
        assert_int_equal(c.moe_inter, 128);
        assert_int_equal(c.first_k_dense, 1);
        assert_int_equal(c.moe_layer_freq, 1);
        assert_int_equal(c.n_heads, 4);
        assert_int_equal(c.q_lora_rank, 192);
        assert_int_equal(c.kv_lora_rank, 128);
        assert_int_equal(c.qk_nope_dim, 64);
        assert_int_equal(c.qk_rope_dim, 32);
        assert_int_equal(c.v_head_dim, 64);
        assert_int_equal(c.n_experts, 16);
        assert_int_equal(c.n_experts_per_tok, 4);
        assert_int_equal(c.n_group, 4);
        assert_int_equal(c.topk_group, 2);
        assert_int_equal(c.n_shared_experts, 1);
        assert_int_equal(c.norm_topk_prob, 1);
        assert_true(c.routed_scaling_factor == 2.5f);
        assert_int_equal(c.use_correction_bias, 1);
        assert_true(c.rms_norm_eps == 1e-6);
        assert_true(c.rope_theta == 10000.0);
        assert_int_equal(c.rope_interleave, 1);
        assert_int_equal(c.yarn, 1);
        assert_true(c.yarn_factor == 40.0 && c.yarn_orig_max_pos == 4096.0);
        assert_true(c.yarn_beta_fast == 32.0 && c.yarn_beta_slow == 1.0);
        assert_true(c.yarn_mscale == 1.0 && c.yarn_mscale_all_dim == 1.0);
        assert_int_equal(c.max_position_embeddings, 163840);
        assert_int_equal(c.n_nextn_layers, 0);
        assert_int_equal(c.bos_token_id, 0);
        assert_int_equal(c.eos_token_id, 1);
        assert_int_equal(c.tie_word_embeddings, 0);
        assert_int_equal(c.fp8, i == 0);
        assert_int_equal(c.weight_block[0], 128);
        assert_int_equal(c.weight_block[1], 128);
        assert_int_equal(dsi_config_qk_head_dim(&c), 96);
        assert_int_equal(dsi_config_kv_dim(&c), 160);
        assert_false(dsi_config_is_moe_layer(&c, 0));
        assert_true(dsi_config_is_moe_layer(&c, 1) && dsi_config_is_moe_layer(&c, 3));
    }
}

/* Each field that changes the computation reaches the struct. */
static void test_fields_read(void **state) {
    dsi_config c;
#define OK(path, value) do { int rc_ = parse_with("tiny-fp8", path, value, &c); \
        if (rc_) fprintf(stderr, "  %s=%s: %s\n", path, value ? value : "(removed)", dsi_last_error()); \
        assert_int_equal(rc_, DSI_OK); } while (0)
    OK("q_lora_rank", "null");
    assert_int_equal(c.q_lora_rank, 0);
    OK("q_lora_rank", NULL);
    assert_int_equal(c.q_lora_rank, 0);
    OK("moe_layer_freq", "2");
    assert_int_equal(c.moe_layer_freq, 2);
    assert_false(dsi_config_is_moe_layer(&c, 1));
    assert_true(dsi_config_is_moe_layer(&c, 2));
    assert_false(dsi_config_is_moe_layer(&c, 3));
    OK("first_k_dense_replace", "3");
    assert_int_equal(c.first_k_dense, 3);
    assert_false(dsi_config_is_moe_layer(&c, 2));
    OK("num_nextn_predict_layers", "1");
    assert_int_equal(c.n_nextn_layers, 1);
    OK("n_shared_experts", "2");
    assert_int_equal(c.n_shared_experts, 2);
    OK("n_shared_experts", NULL);
    assert_int_equal(c.n_shared_experts, 0);
    OK("routed_scaling_factor", "1.5");
    assert_true(c.routed_scaling_factor == 1.5f);
    OK("norm_topk_prob", "false");
    assert_int_equal(c.norm_topk_prob, 0);
    OK("rms_norm_eps", "1e-5");
    assert_true(c.rms_norm_eps == 1e-5);
    OK("rope_theta", "50000");
    assert_true(c.rope_theta == 50000.0);
    OK("rope_interleave", "false");
    assert_int_equal(c.rope_interleave, 0);
    OK("tie_word_embeddings", "true");
    assert_int_equal(c.tie_word_embeddings, 1);
    OK("max_position_embeddings", "8192");
    assert_int_equal(c.max_position_embeddings, 8192);
    OK("eos_token_id", "7");
    assert_int_equal(c.eos_token_id, 7);
    assert_int_equal(c.n_eos_token_ids, 1);
    /* a list, as transformers allows: any of them ends a generation */
    OK("eos_token_id", "[7, 9]");
    assert_int_equal(c.eos_token_id, 7);
    assert_int_equal(c.n_eos_token_ids, 2);
    assert_int_equal(c.eos_token_ids[1], 9);
    OK("topk_method", NULL); /* absent: DeepSeek-V3's default */
    assert_int_equal(c.use_correction_bias, 1);
    OK("model_type", "\"kimi_k2\"");
    /* YaRN */
    OK("rope_scaling", "null");
    assert_int_equal(c.yarn, 0);
    OK("rope_scaling", NULL);
    assert_int_equal(c.yarn, 0);
    OK("rope_scaling", "{\"rope_type\":\"yarn\",\"factor\":8,\"original_max_position_embeddings\":2048,"
                       "\"beta_fast\":16,\"beta_slow\":2,\"mscale\":0.707,\"mscale_all_dim\":0.5}");
    assert_int_equal(c.yarn, 1);
    assert_true(c.yarn_factor == 8 && c.yarn_orig_max_pos == 2048 && c.yarn_beta_fast == 16 && c.yarn_beta_slow == 2);
    assert_true(c.yarn_mscale == 0.707 && c.yarn_mscale_all_dim == 0.5);
    OK("rope_scaling.mscale_all_dim", NULL); /* HF default 0 */
    assert_true(c.yarn_mscale_all_dim == 0.0);
    /* quantization */
    OK("quantization_config", NULL);
    assert_int_equal(c.fp8, 0);
    OK("quantization_config", "null");
    assert_int_equal(c.fp8, 0);
    OK("quantization_config.weight_block_size", "[128, 128.0]");
    assert_int_equal(c.fp8, 1);
    assert_true(c.weight_block[0] == 128 && c.weight_block[1] == 128);
    OK("quantization_config.weight_block_size", NULL);
    assert_true(c.weight_block[0] == 128 && c.weight_block[1] == 128);
    OK("quantization_config.weight_block_size", "[64, 32]"); /* any block size is honoured */
    assert_true(c.weight_block[0] == 64 && c.weight_block[1] == 32);
    OK("quantization_config.fmt", NULL);
    assert_int_equal(c.fp8, 1);
#undef OK
}

typedef struct bad_case {
    const char *path, *value; /* value NULL: field removed */
    int code;
    const char *needle;       /* must appear in the message */
} bad_case;

static void run_bad(const bad_case *cases, size_t n) {
    for (size_t i = 0; i < n; i++) {
        dsi_config c;
        int rc = parse_with("tiny-fp8", cases[i].path, cases[i].value, &c);
        /* an unsupported string value is quoted back (e.g. "llama") */
        char quoted[128] = "";
        if (cases[i].code == DSI_EUNSUPPORTED && cases[i].value && cases[i].value[0] == '"')
            snprintf(quoted, sizeof quoted, "'%.*s'", (int)strlen(cases[i].value) - 2, cases[i].value + 1);
        if (rc != cases[i].code || !strstr(dsi_last_error(), cases[i].needle) || !strstr(dsi_last_error(), quoted)) {
            fprintf(stderr, "  %s=%s: got %s \"%s\", want %s naming '%s'\n", cases[i].path,
                    cases[i].value ? cases[i].value : "(removed)", dsi_status_name(rc), dsi_last_error(),
                    dsi_status_name(cases[i].code), cases[i].needle);
            fail();
        }
    }
}

static void test_unsupported(void **state) {
    static const bad_case cases[] = {
        {"model_type", "\"llama\"", DSI_EUNSUPPORTED, "model_type"},
        {"model_type", "\"deepseek_v2\"", DSI_EUNSUPPORTED, "model_type"},
        {"scoring_func", "\"softmax\"", DSI_EUNSUPPORTED, "scoring_func"},
        {"topk_method", "\"greedy\"", DSI_EUNSUPPORTED, "topk_method"},
        {"topk_method", "\"group_limited_greedy\"", DSI_EUNSUPPORTED, "topk_method"},
        {"hidden_act", "\"gelu\"", DSI_EUNSUPPORTED, "hidden_act"},
        {"rope_scaling", "{\"type\":\"linear\",\"factor\":2}", DSI_EUNSUPPORTED, "rope_scaling"},
        {"rope_scaling", "{\"factor\":2}", DSI_EUNSUPPORTED, "rope_scaling"},
        {"quantization_config.quant_method", "\"awq\"", DSI_EUNSUPPORTED, "quant_method"},
        {"quantization_config.quant_method", NULL, DSI_EUNSUPPORTED, "quant_method"},
        {"quantization_config.fmt", "\"e5m2\"", DSI_EUNSUPPORTED, "fmt"},
        {"attention_bias", "true", DSI_EUNSUPPORTED, "attention_bias"},
        /* static FP8 activations need input scales this engine never reads */
        {"quantization_config.activation_scheme", "\"static\"", DSI_EUNSUPPORTED, "activation_scheme"},
    };
    run_bad(cases, sizeof cases / sizeof cases[0]);
}

static void test_wrong_types(void **state) {
    static const bad_case cases[] = {
        {"model_type", "3", DSI_EFORMAT, "model_type"},
        {"vocab_size", "\"2048\"", DSI_EFORMAT, "vocab_size"},
        {"hidden_size", "256.5", DSI_EFORMAT, "hidden_size"},
        {"hidden_size", "1e12", DSI_EFORMAT, "'hidden_size' is out of range"},
        {"num_hidden_layers", "2147483648", DSI_EFORMAT, "'num_hidden_layers' is out of range"},
        {"num_hidden_layers", "[4]", DSI_EFORMAT, "num_hidden_layers"},
        {"q_lora_rank", "true", DSI_EFORMAT, "q_lora_rank"},
        {"n_group", "\"4\"", DSI_EFORMAT, "n_group"},
        {"norm_topk_prob", "1", DSI_EFORMAT, "norm_topk_prob"},
        {"attention_bias", "\"no\"", DSI_EFORMAT, "attention_bias"},
        {"rms_norm_eps", "\"1e-6\"", DSI_EFORMAT, "rms_norm_eps"},
        {"routed_scaling_factor", "{}", DSI_EFORMAT, "routed_scaling_factor"},
        {"scoring_func", "5", DSI_EFORMAT, "scoring_func"},
        {"topk_method", "[]", DSI_EFORMAT, "topk_method"},
        {"hidden_act", "{}", DSI_EFORMAT, "hidden_act"},
        {"rope_scaling", "\"yarn\"", DSI_EFORMAT, "rope_scaling"},
        {"rope_scaling.type", "1", DSI_EFORMAT, "type"},
        {"rope_scaling.factor", "\"40\"", DSI_EFORMAT, "factor"},
        {"rope_scaling.beta_fast", "[32]", DSI_EFORMAT, "beta_fast"},
        {"quantization_config", "\"fp8\"", DSI_EFORMAT, "quantization_config"},
        {"quantization_config.quant_method", "8", DSI_EFORMAT, "quant_method"},
        {"quantization_config.weight_block_size", "[128]", DSI_EFORMAT, "weight_block_size"},
        {"quantization_config.weight_block_size", "128", DSI_EFORMAT, "weight_block_size"},
        {"quantization_config.weight_block_size", "[128.5, 128]", DSI_EFORMAT, "weight_block_size"},
        {"quantization_config.weight_block_size", "[0, 128]", DSI_EFORMAT, "weight_block_size"},
        {"quantization_config.weight_block_size", "[128, 1e300]", DSI_EFORMAT, "weight_block_size"},
        {"quantization_config.weight_block_size", "[\"128\", 128]", DSI_EFORMAT, "weight_block_size"},
        {"quantization_config.activation_scheme", "1", DSI_EFORMAT, "activation_scheme"},
        {"rope_scaling.rope_type", "1", DSI_EFORMAT, "rope_type"}, /* was unread once 'type' was there */
    };
    run_bad(cases, sizeof cases / sizeof cases[0]);
}

static void test_missing_required(void **state) {
    static const bad_case cases[] = {
        {"model_type", NULL, DSI_EFORMAT, "model_type"},
        {"vocab_size", NULL, DSI_EFORMAT, "vocab_size"},
        {"hidden_size", NULL, DSI_EFORMAT, "hidden_size"},
        {"num_hidden_layers", NULL, DSI_EFORMAT, "num_hidden_layers"},
        {"intermediate_size", NULL, DSI_EFORMAT, "intermediate_size"},
        {"num_attention_heads", NULL, DSI_EFORMAT, "num_attention_heads"},
        {"kv_lora_rank", "null", DSI_EFORMAT, "kv_lora_rank"},
        {"qk_nope_head_dim", NULL, DSI_EFORMAT, "qk_nope_head_dim"},
        {"qk_rope_head_dim", NULL, DSI_EFORMAT, "qk_rope_head_dim"},
        {"v_head_dim", NULL, DSI_EFORMAT, "v_head_dim"},
    };
    run_bad(cases, sizeof cases / sizeof cases[0]);
}

static void test_inconsistent(void **state) {
    static const bad_case cases[] = {
        {"n_routed_experts", "15", DSI_EFORMAT, "n_group"},
        {"n_group", "3", DSI_EFORMAT, "n_group"},
        {"n_group", "0", DSI_EFORMAT, "n_group"},
        {"topk_group", "5", DSI_EFORMAT, "topk_group"},
        {"topk_group", "0", DSI_EFORMAT, "topk_group"},
        {"num_experts_per_tok", "9", DSI_EFORMAT, "num_experts_per_tok"}, /* 2 kept groups x 4 experts */
        {"num_experts_per_tok", "0", DSI_EFORMAT, "num_experts_per_tok"},
        {"num_experts_per_tok", NULL, DSI_EFORMAT, "num_experts_per_tok"},
        {"moe_intermediate_size", NULL, DSI_EFORMAT, "moe_intermediate_size"},
        {"n_routed_experts", "5000", DSI_EFORMAT, "n_routed_experts"},
        {"n_shared_experts", "-1", DSI_EFORMAT, "n_shared_experts"},
        {"qk_rope_head_dim", "31", DSI_EFORMAT, "qk_rope_head_dim"},
        {"qk_nope_head_dim", "0", DSI_EFORMAT, "qk_nope_head_dim"},
        {"v_head_dim", "-64", DSI_EFORMAT, "v_head_dim"},
        {"kv_lora_rank", "0", DSI_EFORMAT, "kv_lora_rank"},
        {"q_lora_rank", "-1", DSI_EFORMAT, "q_lora_rank"},
        {"vocab_size", "0", DSI_EFORMAT, "vocab_size"},
        {"hidden_size", "-256", DSI_EFORMAT, "hidden_size"},
        {"num_hidden_layers", "0", DSI_EFORMAT, "num_hidden_layers"},
        {"num_attention_heads", "0", DSI_EFORMAT, "num_attention_heads"},
        {"intermediate_size", "0", DSI_EFORMAT, "intermediate_size"},
        {"first_k_dense_replace", "-1", DSI_EFORMAT, "first_k_dense_replace"},
        {"moe_layer_freq", "0", DSI_EFORMAT, "moe_layer_freq"},
        {"rms_norm_eps", "0", DSI_EFORMAT, "rms_norm_eps"},
        {"rope_theta", "-1", DSI_EFORMAT, "rope_theta"},
        {"rope_scaling.factor", "0", DSI_EFORMAT, "factor"},
        {"rope_scaling.factor", "-40", DSI_EFORMAT, "factor"},
        {"max_position_embeddings", "0", DSI_EFORMAT, "max_position_embeddings"},
        {"num_nextn_predict_layers", "-1", DSI_EFORMAT, "num_nextn_predict_layers"},
        {"eos_token_id", "2048", DSI_EFORMAT, "eos_token_id"},
        {"eos_token_id", "[1, 2048]", DSI_EFORMAT, "eos_token_id 2048"},
        {"eos_token_id", "[]", DSI_EFORMAT, "'eos_token_id' must list"},
        {"eos_token_id", "[1, 2, 3, 4, 5, 6, 7, 8]", DSI_EFORMAT, "'eos_token_id' must list"},
        {"eos_token_id", "[1, 1.5]", DSI_EFORMAT, "'eos_token_id' element 1"},
        {"eos_token_id", "[1, \"2\"]", DSI_EFORMAT, "'eos_token_id' element 1"},
        {"bos_token_id", "-2", DSI_EFORMAT, "bos_token_id"},
        /* negative is not "dense": the layers would be read as dense MLPs */
        {"n_routed_experts", "-1", DSI_EFORMAT, "n_routed_experts"},
        /* stored as float: 1e39 would be +inf and every logit NaN */
        {"routed_scaling_factor", "1e39", DSI_EFORMAT, "routed_scaling_factor"},
        {"routed_scaling_factor", "0", DSI_EFORMAT, "routed_scaling_factor"},
        {"routed_scaling_factor", "-2.5", DSI_EFORMAT, "routed_scaling_factor"},
        /* rope: each of these gave non-finite logits (log(theta) = 0 divides,
         * a YaRN factor of 1e-300 is 0 as a float, log of a negative length) */
        {"rope_theta", "1", DSI_EFORMAT, "rope_theta"},
        {"rope_theta", "0.5", DSI_EFORMAT, "rope_theta"},
        {"rope_scaling.factor", "1e-300", DSI_EFORMAT, "factor"},
        {"rope_scaling.factor", "0.5", DSI_EFORMAT, "factor"},
        {"rope_scaling.original_max_position_embeddings", "-1", DSI_EFORMAT, "original_max_position_embeddings"},
        {"rope_scaling.original_max_position_embeddings", "0", DSI_EFORMAT, "original_max_position_embeddings"},
        {"rope_scaling.beta_fast", "0", DSI_EFORMAT, "beta_fast"},
        {"rope_scaling.beta_slow", "-1", DSI_EFORMAT, "beta_slow"},
        {"rope_scaling.mscale", "1e38", DSI_EFORMAT, "mscale"},
        {"rope_scaling.mscale", "-1", DSI_EFORMAT, "mscale"},
        {"rope_scaling.mscale_all_dim", "1e38", DSI_EFORMAT, "mscale_all_dim"},
        /* in range one by one, but past float32 once combined: a zero frequency */
        {"rope_scaling.factor", "1e300", DSI_EFORMAT, "rope_scaling"},
        /* transformers goes by rope_type: 'type' alone must not decide */
        {"rope_scaling.rope_type", "\"linear\"", DSI_EFORMAT, "rope_type"},
    };
    run_bad(cases, sizeof cases / sizeof cases[0]);
}

static void test_not_json(void **state) {
    const char *bad[] = {"", "[]", "{", "null", "\"deepseek_v3\"", "{\"model_type\": \"deepseek_v3\"", "\xff\xfe"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        dsi_config c;
        assert_int_equal(dsi_config_parse(bad[i], strlen(bad[i]), &c), DSI_EFORMAT);
        assert_true(tu_msg_has("config", NULL, NULL));
    }
    /* the length bounds the parse: a valid config cut short is not valid */
    char *text = golden_text("tiny-fp8");
    dsi_config c;
    assert_int_equal(dsi_config_parse(text, strlen(text), &c), DSI_OK);
    assert_int_equal(dsi_config_parse(text, strlen(text) / 2, &c), DSI_EFORMAT);
    /* nothing but whitespace may follow the object: Python's json.load (what
     * transformers reads it with) refuses the rest, and two concatenated
     * configs must not mean the first one */
    const char *tails[] = {"garbage", "{\"n_shared_experts\": 0}", "\n}"};
    for (size_t i = 0; i < sizeof tails / sizeof tails[0]; i++) {
        size_t tl = strlen(tails[i]);
        char *buf = malloc(strlen(text) + tl);
        memcpy(buf, text, strlen(text));
        memcpy(buf + strlen(text), tails[i], tl);
        assert_int_equal(dsi_config_parse(buf, strlen(text) + tl, &c), DSI_EFORMAT);
        assert_true(tu_msg_has("config.json", "after the JSON object", NULL));
        free(buf);
    }
    char *padded = malloc(strlen(text) + 4);
    sprintf(padded, "%s \r\n\t", text);
    assert_int_equal(dsi_config_parse(padded, strlen(padded), &c), DSI_OK);
    free(padded);
    /* a NUL byte between tokens (cJSON skips it as whitespace) */
    char *nul = strdup(text);
    char *colon = strchr(nul, ':');
    assert_true(colon && colon[1] == ' ');
    colon[1] = 0;
    assert_int_equal(dsi_config_parse(nul, strlen(text), &c), DSI_EFORMAT);
    assert_true(tu_msg_has("config.json", "NUL", NULL));
    free(nul);
    free(text);
}

/* A key given twice: cJSON would read the first value, Python's json (and so
 * transformers) the last: the two would run different models. */
static void test_duplicate_keys(void **state) {
    static const struct { const char *path, *dup; } cases[] = {
        {"n_group", "\"n_group\": 8"},
        {"n_shared_experts", "\"n_shared_experts\": 0"},
        {"rope_scaling.factor", "\"factor\": 4"},
        {"quantization_config.weight_block_size", "\"weight_block_size\": [64, 64]"},
        {"rope_scaling", "\"rope_scaling\": null"},
    };
    char *text = golden_text("tiny-fp8");
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        /* insert the duplicate right after the object that holds the key opens */
        const char *dot = strchr(cases[i].path, '.');
        const char *at = text;
        if (dot) {
            char parent[64];
            snprintf(parent, sizeof parent, "\"%.*s\"", (int)(dot - cases[i].path), cases[i].path);
            at = strstr(text, parent);
            assert_non_null(at);
        }
        at = strchr(at, '{') + 1;
        char *buf = malloc(strlen(text) + strlen(cases[i].dup) + 2);
        size_t head = (size_t)(at - text);
        sprintf(buf, "%.*s%s,%s", (int)head, text, cases[i].dup, at);
        dsi_config c;
        int rc = dsi_config_parse(buf, strlen(buf), &c);
        const char *leaf = dot ? dot + 1 : cases[i].path;
        if (rc != DSI_EFORMAT || !tu_msg_has(leaf, "more than once", NULL)) {
            fprintf(stderr, "  duplicate %s: got %s \"%s\"\n", cases[i].path, dsi_status_name(rc), dsi_last_error());
            fail();
        }
        free(buf);
    }
    /* keys nobody reads may repeat (architectures, use_cache...): not ours to judge */
    char *buf = malloc(strlen(text) + 32);
    sprintf(buf, "{\"use_cache\": 1,%s", strchr(text, '{') + 1);
    dsi_config c;
    assert_int_equal(dsi_config_parse(buf, strlen(buf), &c), DSI_OK);
    free(buf);
    free(text);
}

/* Field-by-field, so a failure says which field did not survive. */
static void assert_config_equal(const dsi_config *a, const dsi_config *b, const char *what) {
    int bad = 0;
#define F(x) if (a->x != b->x) { fprintf(stderr, "  %s: field " #x " differs: %g vs %g\n", what, (double)a->x, (double)b->x); bad = 1; }
    F(vocab_size) F(hidden) F(n_layers) F(dense_inter) F(moe_inter) F(first_k_dense) F(moe_layer_freq) F(n_heads)
    F(q_lora_rank) F(kv_lora_rank) F(qk_nope_dim) F(qk_rope_dim) F(v_head_dim) F(n_experts) F(n_experts_per_tok)
    F(n_group) F(topk_group) F(n_shared_experts) F(norm_topk_prob) F(routed_scaling_factor) F(use_correction_bias)
    F(rms_norm_eps) F(rope_theta) F(rope_interleave) F(yarn) F(yarn_factor) F(yarn_orig_max_pos) F(yarn_beta_fast)
    F(yarn_beta_slow) F(yarn_mscale) F(yarn_mscale_all_dim) F(max_position_embeddings) F(n_nextn_layers)
    F(bos_token_id) F(eos_token_id) F(n_eos_token_ids) F(eos_token_ids[0]) F(eos_token_ids[1]) F(tie_word_embeddings) F(fp8) F(weight_block[0]) F(weight_block[1])
#undef F
    /* and nothing was forgotten in the list above (both structs are memset before filling) */
    if (!bad && memcmp(a, b, sizeof *a)) { fprintf(stderr, "  %s: structs differ in a field not listed\n", what); bad = 1; }
    if (bad) fail();
}

static void roundtrip(const dsi_config *c, const char *what) {
    char *js = dsi_config_to_json(c);
    assert_non_null(js);
    dsi_config back;
    int rc = dsi_config_parse(js, strlen(js), &back);
    if (rc) fprintf(stderr, "  %s: %s\n%s\n", what, dsi_last_error(), js);
    assert_int_equal(rc, DSI_OK);
    assert_config_equal(&back, c, what);
    free(js);
}

static void test_to_json_roundtrip(void **state) {
    dsi_config c;
    assert_int_equal(parse_with("tiny-fp8", NULL, NULL, &c), DSI_OK);
    roundtrip(&c, "golden tiny-fp8");
    assert_int_equal(parse_with("tiny-bf16", NULL, NULL, &c), DSI_OK);
    roundtrip(&c, "golden tiny-bf16");
    for (int fp8 = 0; fp8 <= 1; fp8++) {
        assert_int_equal(dsi_config_preset(DSI_PRESET_TINY, 0, fp8, &c), DSI_OK);
        roundtrip(&c, "preset tiny");
        assert_int_equal(dsi_config_preset(DSI_PRESET_SMALL, 0, fp8, &c), DSI_OK);
        roundtrip(&c, "preset small");
        assert_int_equal(dsi_config_preset(DSI_PRESET_V3, 61, fp8, &c), DSI_OK);
        assert_true(c.n_layers == 61 && c.first_k_dense == 3 && c.n_experts == 256);
        roundtrip(&c, "preset v3");
    }
    assert_int_equal(dsi_config_preset(DSI_PRESET_V3, 2, 1, &c), DSI_OK);
    assert_int_equal(c.first_k_dense, 2); /* clamped to the layer count */
    /* every optional feature toggled away from the preset */
    assert_int_equal(dsi_config_preset(DSI_PRESET_TINY, 0, 1, &c), DSI_OK);
    c.q_lora_rank = 0;
    c.moe_layer_freq = 2;
    c.n_nextn_layers = 1;
    c.rope_interleave = 0;
    c.tie_word_embeddings = 1;
    c.norm_topk_prob = 0;
    c.routed_scaling_factor = 1.0f / 3.0f; /* not exact in decimal: printed to full precision */
    c.rms_norm_eps = 1e-5;
    c.rope_theta = 123456.789;
    c.yarn_factor = 4.25;
    c.yarn_mscale = 0.7071067811865476;
    c.yarn_mscale_all_dim = 0;
    c.n_shared_experts = 0;
    c.bos_token_id = -1;
    c.eos_token_id = c.eos_token_ids[0] = 5;
    c.eos_token_ids[1] = 1;
    c.n_eos_token_ids = 2;
    roundtrip(&c, "variant");
    c.yarn = 0;
    c.yarn_factor = c.yarn_orig_max_pos = c.yarn_beta_fast = c.yarn_beta_slow = c.yarn_mscale = 0;
    c.fp8 = 0;
    c.weight_block[0] = c.weight_block[1] = 128;
    roundtrip(&c, "variant without yarn/fp8");
    assert_int_equal(dsi_config_preset((dsi_preset)99, 0, 0, &c), DSI_EINVAL);
}

static void test_load_file(void **state) {
    char path[1024];
    dsi_config c;
    snprintf(path, sizeof path, "%s/golden/tiny-fp8/config.json", DSI_TEST_DATA);
    assert_int_equal(dsi_config_load(path, &c), DSI_OK);
    assert_int_equal(c.fp8, 1);
    char *dir = tu_mkdtemp("cfg");
    snprintf(path, sizeof path, "%s/none.json", dir);
    assert_int_equal(dsi_config_load(path, &c), DSI_ENOTFOUND);
    assert_true(tu_msg_has(path, NULL, NULL));
    snprintf(path, sizeof path, "%s/config.json", dir);
    const char *bad = "{\"model_type\":\"llama\"}";
    assert_int_equal(tu_write_file(path, bad, strlen(bad)), 0);
    assert_int_equal(dsi_config_load(path, &c), DSI_EUNSUPPORTED);
    assert_true(tu_msg_has(path, "model_type", "llama"));
    assert_int_equal(dsi_config_load(dir, &c), DSI_EIO);
    assert_true(tu_msg_has(dir, "not a regular file", NULL));
    /* past the 1 MiB read: it was cut there and reported as "not a JSON object" */
    char *text = golden_text("tiny-fp8");
    size_t tl = strlen(text), big = (1u << 20) + 16;
    char *pad = malloc(big);
    memset(pad, ' ', big);
    memcpy(pad, text, tl - 1); /* drop the final '}'... */
    pad[big - 1] = '}';        /* ...and close the object after 1 MiB of spaces */
    assert_int_equal(dsi_config_parse(pad, big, &c), DSI_OK); /* valid JSON */
    assert_int_equal(tu_write_file(path, pad, big), 0);
    assert_int_equal(dsi_config_load(path, &c), DSI_EFORMAT);
    assert_true(tu_msg_has(path, "1 MiB", NULL));
    free(pad);
    free(text);
    /* a FIFO must not block the load (alarm: a hang fails the test) */
    snprintf(path, sizeof path, "%s/fifo.json", dir);
    assert_int_equal(mkfifo(path, 0600), 0);
    alarm(20);
    assert_int_equal(dsi_config_load(path, &c), DSI_EIO);
    alarm(0);
    assert_true(tu_msg_has(path, "not a regular file", NULL));
    tu_rmtree(dir);
    free(dir);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_golden_configs),
        cmocka_unit_test(test_fields_read),
        cmocka_unit_test(test_unsupported),
        cmocka_unit_test(test_wrong_types),
        cmocka_unit_test(test_missing_required),
        cmocka_unit_test(test_inconsistent),
        cmocka_unit_test(test_not_json),
        cmocka_unit_test(test_duplicate_keys),
        cmocka_unit_test(test_to_json_roundtrip),
        cmocka_unit_test(test_load_file),
    };
    return cmocka_run_group_tests_name("config", tests, NULL, NULL);
}
