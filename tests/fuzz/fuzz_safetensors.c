/* libFuzzer target for the safetensors header parser and the config parser
 * (not part of ctest). Build with clang:
 *
 *     CC=clang cmake -S . -B build-fuzz -DDSI_FUZZ=ON && cmake --build build-fuzz --target fuzz_safetensors
 *     build-fuzz/fuzz_safetensors -max_total_time=60 -max_len=4096
 *
 * The first input byte picks the parser, so one corpus exercises both. Every
 * input must give DSI_OK with views inside the buffer, or an error; never a
 * crash, an out-of-bounds read or undefined behaviour. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "dsinfer/model.h"
#include "dsinfer/safetensors.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 1) return 0;
    /* an exact-size copy so that ASan sees any read past the end */
    size_t len = size - 1;
    uint8_t *buf = malloc(len ? len : 1);
    if (!buf) return 0;
    memcpy(buf, data + 1, len);
    if (data[0] & 1) {
        dsi_config c;
        (void)dsi_config_parse((const char *)buf, len, &c);
    } else {
        dsi_st_set *s = NULL;
        if (dsi_st_open_memory(buf, len, "fuzz", &s) == DSI_OK) {
            for (int i = 0; i < dsi_st_count(s); i++) {
                const dsi_tensor *t = dsi_st_at(s, i);
                const uint8_t *p = t->data;
                if (p < buf || p + t->size_bytes > buf + len || dsi_st_find(s, t->name) != t) abort();
            }
            dsi_st_close(s);
        }
    }
    free(buf);
    return 0;
}
