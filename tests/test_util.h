/* Small helpers shared by the loader/config/CLI tests: temporary directories
 * (mkdtemp under /tmp, removed recursively), whole-file I/O, and checks that
 * an error names what it should. Header-only so no build target is added.
 * Include it first, after `#define _GNU_SOURCE` (nftw needs it). */
#ifndef DSI_TEST_UTIL_H
#define DSI_TEST_UTIL_H

#include <ftw.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "dsinfer/common.h"

static inline int tu_rm_one(const char *path, const struct stat *sb, int flag, struct FTW *ftw) {
    (void)sb; (void)flag; (void)ftw;
    return remove(path);
}

/* Removes a directory tree (depth first, does not follow symlinks). */
static inline void tu_rmtree(const char *dir) {
    if (dir && dir[0]) nftw(dir, tu_rm_one, 16, FTW_DEPTH | FTW_PHYS);
}

/* Creates /tmp/dsi-<tag>-XXXXXX; returns a malloc'ed path or NULL. */
static inline char *tu_mkdtemp(const char *tag) {
    char *p = malloc(256);
    if (!p) return NULL;
    snprintf(p, 256, "/tmp/dsi-%s-XXXXXX", tag);
    if (!mkdtemp(p)) { free(p); return NULL; }
    return p;
}

/* Reads a whole file into a malloc'ed buffer (*len set). NULL on failure. */
static inline void *tu_read_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    void *buf = malloc(n > 0 ? (size_t)n : 1);
    if (buf && n > 0 && fread(buf, 1, (size_t)n, f) != (size_t)n) { free(buf); buf = NULL; }
    fclose(f);
    if (buf) *len = (size_t)n;
    return buf;
}

static inline int tu_write_file(const char *path, const void *buf, size_t len) {
    FILE *f = fopen(path, "wb");
    if (!f) return -1;
    int ok = fwrite(buf, 1, len, f) == len;
    return (fclose(f) == 0 && ok) ? 0 : -1;
}

static inline int tu_copy_file(const char *from, const char *to) {
    size_t len = 0;
    void *buf = tu_read_file(from, &len);
    if (!buf) return -1;
    int rc = tu_write_file(to, buf, len);
    free(buf);
    return rc;
}

/* 1 when the last error message contains every non-NULL needle; prints the
 * message and the missing needle otherwise (so a failing check explains itself). */
static inline int tu_msg_has(const char *a, const char *b, const char *c) {
    const char *msg = dsi_last_error();
    const char *need[3] = {a, b, c};
    for (int i = 0; i < 3; i++)
        if (need[i] && !strstr(msg, need[i])) {
            fprintf(stderr, "  error message \"%s\" lacks \"%s\"\n", msg, need[i]);
            return 0;
        }
    return 1;
}

#endif
