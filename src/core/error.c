/* Thread-local error messages, logging, clock, aligned allocation. */
#include "dsinfer/common.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static _Thread_local char g_err[1024];

const char *dsi_status_name(int s) {
    switch (s) {
    case DSI_OK: return "OK";
    case DSI_EINVAL: return "EINVAL";
    case DSI_ENOMEM: return "ENOMEM";
    case DSI_EIO: return "EIO";
    case DSI_EFORMAT: return "EFORMAT";
    case DSI_EUNSUPPORTED: return "EUNSUPPORTED";
    case DSI_ENOTFOUND: return "ENOTFOUND";
    case DSI_ERANGE: return "ERANGE";
    case DSI_EBUSY: return "EBUSY";
    case DSI_EINTERNAL: return "EINTERNAL";
    case DSI_ECANCELED: return "ECANCELED";
    case DSI_ETIMEOUT: return "ETIMEOUT";
    case DSI_EPEER: return "EPEER";
    default: return "EUNKNOWN";
    }
}

int dsi_error(int status, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(g_err, sizeof g_err, fmt, ap);
    va_end(ap);
    return status;
}

int dsi_error_prefix(int status, const char *fmt, ...) {
    char prefix[512], old[sizeof g_err];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(prefix, sizeof prefix, fmt, ap);
    va_end(ap);
    memcpy(old, g_err, sizeof old);
    size_t pl = strnlen(prefix, sizeof prefix);
    memcpy(g_err, prefix, pl);
    g_err[pl] = ':';
    g_err[pl + 1] = ' ';
    size_t room = sizeof g_err - pl - 3;
    size_t ol = strnlen(old, room);
    memcpy(g_err + pl + 2, old, ol);
    g_err[pl + 2 + ol] = 0;
    return status;
}

const char *dsi_last_error(void) { return g_err; }

static int log_threshold(void) {
    static int level = -1;
    if (level < 0) {
        const char *e = getenv("DSI_LOG_LEVEL");
        level = e ? atoi(e) : 2;
    }
    return level;
}

void dsi_log(int level, const char *fmt, ...) {
    if (level > log_threshold()) return;
    static const char *names[] = {"error", "warn", "info", "debug"};
    char buf[2048];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    fprintf(stderr, "dsinfer %s: %s\n", names[level < 0 ? 0 : level > 3 ? 3 : level], buf);
}

double dsi_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

void *dsi_alloc(size_t size) {
    if (size == 0) size = 64;
    size_t rounded = (size + 63) & ~(size_t)63;
    void *p = aligned_alloc(64, rounded);
    if (p) memset(p, 0, rounded);
    return p;
}

void dsi_free(void *p) { free(p); }
