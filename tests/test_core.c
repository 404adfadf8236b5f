/* Core utilities: error messages, thread pool coverage. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>
#include <stdatomic.h>
#include <string.h>

#include "core/threadpool.h"
#include "dsinfer/common.h"

static void test_error_message(void **state) {
    int rc = dsi_error(DSI_EFORMAT, "bad %s at %d", "header", 7);
    assert_int_equal(rc, DSI_EFORMAT);
    assert_string_equal(dsi_last_error(), "bad header at 7");
    dsi_error_prefix(rc, "file %s", "x.safetensors");
    assert_string_equal(dsi_last_error(), "file x.safetensors: bad header at 7");
    assert_string_equal(dsi_status_name(DSI_ENOMEM), "ENOMEM");
}

static atomic_int hits[1000];
static void mark(void *ctx, int64_t b, int64_t e, int t) {
    for (int64_t i = b; i < e; i++) atomic_fetch_add(&hits[i], 1);
}

static void test_pool_covers_each_item_once(void **state) {
    for (int threads = 1; threads <= 3; threads++) {
        dsi_pool *p = dsi_pool_create(threads);
        assert_non_null(p);
        for (int n = 1; n < 1000; n += 97) {
            for (int g = 1; g <= 16; g *= 4) {
                /* the default chunking, then more chunks than items */
                for (int min_chunks = 0; min_chunks <= 2000; min_chunks += 1000) {
                    memset(hits, 0, sizeof hits);
                    if (min_chunks) dsi_pool_for_chunks(p, n, g, min_chunks, mark, NULL);
                    else dsi_pool_for(p, n, g, mark, NULL);
                    for (int i = 0; i < n; i++) assert_int_equal(atomic_load(&hits[i]), 1);
                    for (int i = n; i < 1000; i++) assert_int_equal(atomic_load(&hits[i]), 0);
                }
            }
        }
        dsi_pool_destroy(p);
    }
    dsi_pool_destroy(NULL);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_error_message),
        cmocka_unit_test(test_pool_covers_each_item_once),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
