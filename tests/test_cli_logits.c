/* `dsinfer logits` end to end: the binary (DSI_BINARY) is run on the golden
 * checkpoints with the oracle's prompt ids, one-shot, in chunks of 7, and
 * decoding token by token from position 9; the raw float32 file it writes
 * must be exactly [n, vocab] and match the oracle's logits. A damaged
 * checkpoint must exit 1 with a message naming the file. */
#define _GNU_SOURCE
#include "test_util.h"

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>
#include <sys/wait.h>

#include "dsinfer/safetensors.h"
#include "golden_util.h"

#define TOL 1e-3 /* as tests/test_golden.c: float32 accumulation against the float64 oracle */

static char *g_tmp;

static int group_setup(void **state) {
    g_tmp = tu_mkdtemp("cli");
    return g_tmp ? 0 : -1;
}
static int group_teardown(void **state) {
    tu_rmtree(g_tmp);
    free(g_tmp);
    return 0;
}

/* Runs a shell command; returns its exit status (-1 if it did not exit). */
static int run(const char *cmd) {
    int st = system(cmd);
    return (st != -1 && WIFEXITED(st)) ? WEXITSTATUS(st) : -1;
}

/* Runs `dsinfer logits` on golden `model` / `case_name` with extra flags and
 * checks the output file against the oracle. */
static void check_logits(const char *model, const char *case_name, const char *flags) {
    char dir[512], path[600], ids_name[64], logits_name[64];
    snprintf(dir, sizeof dir, "%s/golden/%s", DSI_TEST_DATA, model);
    snprintf(path, sizeof path, "%s/golden.safetensors", dir);
    dsi_st_set *gold;
    assert_int_equal(dsi_st_open_file(path, &gold), DSI_OK);
    snprintf(ids_name, sizeof ids_name, "%s.ids", case_name);
    snprintf(logits_name, sizeof logits_name, "%s.logits", case_name);
    const dsi_tensor *ids = golden_tensor(gold, ids_name), *ref = golden_tensor(gold, logits_name);
    assert_true(ids && ref && ids->dtype == DSI_I32 && ref->dtype == DSI_F32);
    int n = (int)ids->shape[0], V = (int)ref->shape[1];

    size_t cap = 64 + (size_t)n * 12;
    char *list = malloc(cap), *cmd = malloc(cap + 2048);
    list[0] = 0;
    for (int i = 0; i < n; i++)
        snprintf(list + strlen(list), cap - strlen(list), "%s%d", i ? "," : "", ((const int32_t *)ids->data)[i]);
    char out[600];
    snprintf(out, sizeof out, "%s/%s-%s.f32", g_tmp, model, case_name);
    unlink(out);
    snprintf(cmd, cap + 2048, "'%s' logits --model '%s' --ids %s --out '%s' --threads 2 %s", DSI_BINARY, dir, list, out,
             flags);
    int rc = run(cmd);
    assert_int_equal(rc, 0);

    size_t len = 0;
    float *got = tu_read_file(out, &len);
    assert_non_null(got);
    assert_int_equal(len, (size_t)n * V * sizeof(float));
    double err = rel_err(got, ref->data, (size_t)n * V);
    printf("  %s %s %-26s: %d x %d logits, max|err|/max|ref| = %.2e (tol %.0e)\n", model, case_name,
           flags[0] ? flags : "(one shot)", n, V, err, TOL);
    assert_true(err <= TOL);
    free(got);
    free(list);
    free(cmd);
    dsi_st_close(gold);
}

static void test_logits_fp8(void **state) {
    check_logits("tiny-fp8", "prompt2", "");
    check_logits("tiny-fp8", "prompt2", "--chunk 7");
    check_logits("tiny-fp8", "prompt2", "--decode-from 9");
    check_logits("tiny-fp8", "greedy0", "--decode-from 9 --chunk 4");
}

static void test_logits_bf16(void **state) {
    check_logits("tiny-bf16", "prompt2", "");
    check_logits("tiny-bf16", "prompt2", "--chunk 7");
    check_logits("tiny-bf16", "prompt2", "--decode-from 9");
}

/* A checkpoint with a truncated shard: exit 1, the shard named on stderr,
 * and no output file left behind. */
static void test_logits_damaged(void **state) {
    char src[512], dst[600], a[1024], b[1024];
    snprintf(src, sizeof src, "%s/golden/tiny-fp8", DSI_TEST_DATA);
    snprintf(dst, sizeof dst, "%s/damaged", g_tmp);
    assert_int_equal(mkdir(dst, 0755), 0);
    const char *files[] = {"config.json", "model.safetensors.index.json", "model-00001-of-00003.safetensors",
                           "model-00002-of-00003.safetensors", "model-00003-of-00003.safetensors"};
    for (int i = 0; i < 5; i++) {
        snprintf(a, sizeof a, "%s/%s", src, files[i]);
        snprintf(b, sizeof b, "%s/%s", dst, files[i]);
        assert_int_equal(tu_copy_file(a, b), 0);
    }
    size_t len = 0;
    void *buf = tu_read_file(b, &len); /* the last shard */
    assert_non_null(buf);
    assert_int_equal(tu_write_file(b, buf, len / 2), 0);
    free(buf);
    char cmd[4096], err_path[700], out[700];
    snprintf(err_path, sizeof err_path, "%s/stderr.txt", g_tmp);
    snprintf(out, sizeof out, "%s/damaged.f32", g_tmp);
    snprintf(cmd, sizeof cmd, "'%s' logits --model '%s' --ids 1,2,3 --out '%s' 2>'%s'", DSI_BINARY, dst, out, err_path);
    assert_int_equal(run(cmd), 1);
    char *msg = tu_read_file(err_path, &len);
    assert_non_null(msg);
    msg = realloc(msg, len + 1);
    msg[len] = 0;
    printf("  damaged checkpoint: %s", msg);
    assert_non_null(strstr(msg, "model-00003-of-00003.safetensors"));
    assert_non_null(strstr(msg, "truncated"));
    free(msg);
    assert_int_not_equal(access(out, F_OK), 0);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_logits_fp8),
        cmocka_unit_test(test_logits_bf16),
        cmocka_unit_test(test_logits_damaged),
    };
    return cmocka_run_group_tests_name("cli-logits", tests, group_setup, group_teardown);
}
