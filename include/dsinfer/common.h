/* dsinfer/common.h - status codes, error messages, logging, small utilities.
 *
 * Every fallible function returns an int status: DSI_OK (0) or a negative
 * DSI_E* code. The failing function records a human-readable message in a
 * thread-local buffer, readable with dsi_last_error() until the next failure
 * on the same thread:
 *
 *     if (dsi_model_load(dir, &opts, &m) != DSI_OK)
 *         fprintf(stderr, "load failed: %s\n", dsi_last_error());
 */
#ifndef DSINFER_COMMON_H
#define DSINFER_COMMON_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum {
    DSI_OK = 0,
    DSI_EINVAL = -1,      /* bad argument or input */
    DSI_ENOMEM = -2,      /* allocation failed */
    DSI_EIO = -3,         /* read/write/open failed */
    DSI_EFORMAT = -4,     /* malformed file or data */
    DSI_EUNSUPPORTED = -5,/* valid but not supported by this build */
    DSI_ENOTFOUND = -6,   /* missing tensor, file, key */
    DSI_ERANGE = -7,      /* value or offset out of range */
    DSI_EBUSY = -8,       /* resource exhausted for now (retry later) */
    DSI_EINTERNAL = -9,   /* our bug */
    DSI_ECANCELED = -10,  /* cancelled by the caller */
    DSI_ETIMEOUT = -11,   /* peer did not answer in time */
    DSI_EPEER = -12,      /* remote process failed */
};

/* Short name of a status code ("EINVAL"...). Never NULL. */
const char *dsi_status_name(int status);

/* Records a formatted message for this thread and returns `status`, so that
 * `return dsi_error(DSI_EINVAL, "bad %s", x);` both reports and returns. */
int dsi_error(int status, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Prefixes the current message with more context ("file.safetensors: ...").
 * Returns `status` unchanged. */
int dsi_error_prefix(int status, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* The last message recorded on this thread ("" if none). Borrowed; valid until
 * the next dsi_error call on this thread. */
const char *dsi_last_error(void);

/* Logging to stderr. Level: 0 error, 1 warn, 2 info, 3 debug. The threshold
 * comes from DSI_LOG_LEVEL (default 2). */
void dsi_log(int level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
#define DSI_LOG_ERROR(...) dsi_log(0, __VA_ARGS__)
#define DSI_LOG_WARN(...) dsi_log(1, __VA_ARGS__)
#define DSI_LOG_INFO(...) dsi_log(2, __VA_ARGS__)
#define DSI_LOG_DEBUG(...) dsi_log(3, __VA_ARGS__)

/* Monotonic clock in seconds. */
double dsi_now(void);

/* Aligned allocation (64-byte alignment), zero-filled. Free with dsi_free. */
void *dsi_alloc(size_t size_bytes);
void dsi_free(void *p);

#define DSI_MIN(a, b) ((a) < (b) ? (a) : (b))
#define DSI_MAX(a, b) ((a) > (b) ? (a) : (b))
#define DSI_CEIL_DIV(a, b) (((a) + (b) - 1) / (b))

#ifdef __cplusplus
}
#endif
#endif
