/* JSON in and out: the load matrix and the placement file. */
#include <cjson/cJSON.h>
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "dsinfer/eplb.h"

/* Reads a whole file into a NUL-terminated buffer (caller frees). */
static int slurp(const char *path, char **buf, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) return dsi_error(DSI_EIO, "%s: %s", path, strerror(errno));
    size_t cap = 1 << 16, n = 0;
    char *b = malloc(cap);
    while (b) {
        size_t got = fread(b + n, 1, cap - n - 1, f);
        n += got;
        if (n + 1 < cap) break;
        char *nb = realloc(b, cap * 2);
        if (!nb) free(b);
        b = nb, cap *= 2;
    }
    int err = ferror(f);
    fclose(f);
    if (!b) return dsi_error(DSI_ENOMEM, "%s: out of memory", path);
    if (err) {
        free(b);
        return dsi_error(DSI_EIO, "%s: read failed", path);
    }
    b[n] = 0;
    *buf = b, *len = n;
    return DSI_OK;
}

static int parse_root(const char *json, size_t len, cJSON **root) {
    const char *end = NULL;
    *root = cJSON_ParseWithLengthOpts(json, len, &end, 0);
    if (!*root) {
        size_t off = end && end >= json ? (size_t)(end - json) : 0;
        const char *at = json + (off < len ? off : len);
        int nonnum = off < len && (!strncmp(at, "NaN", 3) || !strncmp(at, "nan", 3) || !strncmp(at, "Inf", 3) ||
                                   !strncmp(at, "-Inf", 4) || !strncmp(at, "inf", 3));
        return dsi_error(DSI_EFORMAT, "malformed JSON near byte %zu%s", off,
                         nonnum ? " (NaN and Infinity are not JSON numbers)" : "");
    }
    if (!cJSON_IsObject(*root)) {
        cJSON_Delete(*root);
        return dsi_error(DSI_EFORMAT, "expected a JSON object at the top level");
    }
    return DSI_OK;
}

/* Shape of a rectangular array of arrays; rows of `cols` entries each. */
static int matrix_shape(const cJSON *a, const char *name, int *rows, int *cols) {
    if (!cJSON_IsArray(a)) return dsi_error(DSI_EFORMAT, "\"%s\" must be an array of arrays", name);
    int r = cJSON_GetArraySize(a), c = -1, i = 0;
    if (r == 0) return dsi_error(DSI_EFORMAT, "\"%s\" has no rows", name);
    for (const cJSON *row = a->child; row; row = row->next, i++) {
        if (!cJSON_IsArray(row)) return dsi_error(DSI_EFORMAT, "\"%s\"[%d] is not an array", name, i);
        int n = cJSON_GetArraySize(row);
        if (c < 0) c = n;
        if (n != c) return dsi_error(DSI_EFORMAT, "\"%s\"[%d] has %d entries, row 0 has %d", name, i, n, c);
    }
    if (c == 0) return dsi_error(DSI_EFORMAT, "\"%s\" rows are empty", name);
    *rows = r, *cols = c;
    return DSI_OK;
}

int dsi_eplb_load_parse(const char *json, size_t len, double **load, int *n_layers, int *n_experts) {
    if (!json || !load || !n_layers || !n_experts) return dsi_error(DSI_EINVAL, "eplb: bad load_parse arguments");
    *load = NULL;
    cJSON *root;
    int rc = parse_root(json, len, &root);
    if (rc != DSI_OK) return rc;
    const cJSON *a = cJSON_GetObjectItemCaseSensitive(root, "load");
    int L, E;
    if (!a) rc = dsi_error(DSI_EFORMAT, "missing key \"load\" (expected {\"load\": [[...], ...]})");
    else rc = matrix_shape(a, "load", &L, &E);
    double *m = NULL;
    if (rc == DSI_OK && !(m = malloc(sizeof(double) * (size_t)L * E))) rc = dsi_error(DSI_ENOMEM, "out of memory");
    int l = 0;
    for (const cJSON *row = rc == DSI_OK ? a->child : NULL; row && rc == DSI_OK; row = row->next, l++) {
        int e = 0;
        for (const cJSON *v = row->child; v && rc == DSI_OK; v = v->next, e++) {
            if (!cJSON_IsNumber(v)) rc = dsi_error(DSI_EFORMAT, "load[%d][%d] is not a number", l, e);
            else if (!isfinite(v->valuedouble))
                rc = dsi_error(DSI_EFORMAT, "load[%d][%d] is not finite", l, e);
            else if (v->valuedouble < 0)
                rc = dsi_error(DSI_EFORMAT, "load[%d][%d] = %g is negative", l, e, v->valuedouble);
            else m[(size_t)l * E + e] = v->valuedouble;
        }
    }
    cJSON_Delete(root);
    if (rc != DSI_OK) {
        free(m);
        return rc;
    }
    *load = m, *n_layers = L, *n_experts = E;
    return DSI_OK;
}

int dsi_eplb_load_read(const char *path, double **load, int *n_layers, int *n_experts) {
    char *buf;
    size_t len;
    int rc = slurp(path, &buf, &len);
    if (rc != DSI_OK) return rc;
    rc = dsi_eplb_load_parse(buf, len, load, n_layers, n_experts);
    free(buf);
    return rc == DSI_OK ? rc : dsi_error_prefix(rc, "%s", path);
}

static void write_ints(FILE *f, const int32_t *v, int n) {
    fputc('[', f);
    for (int i = 0; i < n; i++) fprintf(f, i ? ",%d" : "%d", v[i]);
    fputc(']', f);
}

int dsi_eplb_placement_write(const dsi_eplb_placement *pl, const double *mom, FILE *f) {
    if (!pl || !pl->phy2log || !pl->log2phy || !pl->logcnt || !f)
        return dsi_error(DSI_EINVAL, "eplb: write needs a complete placement");
    const int L = pl->n_layers, E = pl->n_experts, R = pl->n_slots, K = pl->max_replicas;
    fputs("{\"phy2log\": [\n", f);
    for (int l = 0; l < L; l++) {
        fputs("  ", f);
        write_ints(f, pl->phy2log + (size_t)l * R, R);
        fputs(l + 1 < L ? ",\n" : "\n", f);
    }
    fputs("],\n\"log2phy\": [\n", f);
    for (int l = 0; l < L; l++) {
        fputs("  [", f);
        for (int e = 0; e < E; e++) {
            if (e) fputc(',', f);
            write_ints(f, pl->log2phy + ((size_t)l * E + e) * K, K);
        }
        fputs(l + 1 < L ? "],\n" : "]\n", f);
    }
    fputs("],\n\"logcnt\": [\n", f);
    for (int l = 0; l < L; l++) {
        fputs("  ", f);
        write_ints(f, pl->logcnt + (size_t)l * E, E);
        fputs(l + 1 < L ? ",\n" : "\n", f);
    }
    fputs("]", f);
    if (mom) {
        fputs(",\n\"max_over_mean\": [", f);
        for (int l = 0; l < L; l++) fprintf(f, l ? ",%.9g" : "%.9g", mom[l]);
        fputs("]", f);
    }
    fputs("}\n", f);
    if (ferror(f)) return dsi_error(DSI_EIO, "eplb: write failed");
    return DSI_OK;
}

static int get_int(const cJSON *v, int lo, int hi, int *out) {
    if (!cJSON_IsNumber(v) || !isfinite(v->valuedouble) || v->valuedouble != floor(v->valuedouble) ||
        v->valuedouble < lo || v->valuedouble > hi)
        return -1;
    *out = (int)v->valuedouble;
    return 0;
}

int dsi_eplb_placement_parse(const char *json, size_t len, int E, int R, int P, int expect_layers,
                             dsi_eplb_placement *out) {
    if (!json || !out) return dsi_error(DSI_EINVAL, "eplb: bad placement_parse arguments");
    memset(out, 0, sizeof *out);
    if (E <= 0 || R < E || P <= 0 || R % P)
        return dsi_error(DSI_EINVAL, "eplb: runtime shape E=%d R=%d P=%d is invalid", E, R, P);
    cJSON *root;
    int rc = parse_root(json, len, &root);
    if (rc != DSI_OK) return rc;
    const cJSON *p2l = cJSON_GetObjectItemCaseSensitive(root, "phy2log");
    const cJSON *l2p = cJSON_GetObjectItemCaseSensitive(root, "log2phy");
    const cJSON *cnt = cJSON_GetObjectItemCaseSensitive(root, "logcnt");
    int L = 0, c = 0;
    if (!p2l) rc = dsi_error(DSI_EFORMAT, "missing key \"phy2log\"");
    else rc = matrix_shape(p2l, "phy2log", &L, &c);
    if (rc == DSI_OK && c != R) rc = dsi_error(DSI_EFORMAT, "phy2log rows have %d slots, the runtime has %d", c, R);
    if (rc == DSI_OK && expect_layers > 0 && L != expect_layers)
        rc = dsi_error(DSI_EFORMAT, "placement has %d layers, the model has %d", L, expect_layers);
    if (rc == DSI_OK) {
        out->n_layers = L, out->n_experts = E, out->n_slots = R, out->n_gpus = P;
        if (!(out->phy2log = malloc(sizeof(int32_t) * (size_t)L * R))) rc = dsi_error(DSI_ENOMEM, "out of memory");
    }
    int l = 0;
    for (const cJSON *row = rc == DSI_OK ? p2l->child : NULL; row && rc == DSI_OK; row = row->next, l++) {
        int s = 0;
        for (const cJSON *v = row->child; v && rc == DSI_OK; v = v->next, s++)
            if (get_int(v, 0, E - 1, &out->phy2log[(size_t)l * R + s]))
                rc = dsi_error(DSI_EFORMAT, "phy2log[%d][%d] is not an expert id in [0,%d)", l, s, E);
    }
    if (rc == DSI_OK) rc = dsi_eplb_placement_index(out);
    /* Keep the file's replica order when it gives a consistent log2phy. */
    if (rc == DSI_OK && l2p) {
        int rows, K = 0;
        rc = matrix_shape(l2p, "log2phy", &rows, &c);
        if (rc == DSI_OK && (rows != L || c != E))
            rc = dsi_error(DSI_EFORMAT, "log2phy is %dx%d, expected %dx%d", rows, c, L, E);
        if (rc == DSI_OK) {
            const cJSON *first = l2p->child->child;
            if (!cJSON_IsArray(first) || (K = cJSON_GetArraySize(first)) < out->max_replicas)
                rc = dsi_error(DSI_EFORMAT, "log2phy entries must be arrays of at least %d slots", out->max_replicas);
        }
        int32_t *m = rc == DSI_OK ? malloc(sizeof(int32_t) * (size_t)L * E * K) : NULL;
        if (rc == DSI_OK && !m) rc = dsi_error(DSI_ENOMEM, "out of memory");
        l = 0;
        for (const cJSON *row = rc == DSI_OK ? l2p->child : NULL; row && rc == DSI_OK; row = row->next, l++) {
            int e = 0;
            for (const cJSON *ex = row->child; ex && rc == DSI_OK; ex = ex->next, e++) {
                if (!cJSON_IsArray(ex) || cJSON_GetArraySize(ex) != K) {
                    rc = dsi_error(DSI_EFORMAT, "log2phy[%d][%d] must have %d entries", l, e, K);
                    break;
                }
                int j = 0;
                for (const cJSON *v = ex->child; v && rc == DSI_OK; v = v->next, j++)
                    if (get_int(v, -1, R - 1, &m[((size_t)l * E + e) * K + j]))
                        rc = dsi_error(DSI_EFORMAT, "log2phy[%d][%d][%d] is not a slot in [-1,%d)", l, e, j, R);
            }
        }
        if (rc == DSI_OK) {
            free(out->log2phy);
            out->log2phy = m, out->max_replicas = K;
        } else {
            free(m);
        }
    }
    if (rc == DSI_OK && cnt) {
        int rows;
        rc = matrix_shape(cnt, "logcnt", &rows, &c);
        if (rc == DSI_OK && (rows != L || c != E))
            rc = dsi_error(DSI_EFORMAT, "logcnt is %dx%d, expected %dx%d", rows, c, L, E);
        l = 0;
        for (const cJSON *row = rc == DSI_OK ? cnt->child : NULL; row && rc == DSI_OK; row = row->next, l++) {
            int e = 0, v;
            for (const cJSON *x = row->child; x && rc == DSI_OK; x = x->next, e++)
                if (get_int(x, 0, INT_MAX, &v) || v != out->logcnt[(size_t)l * E + e])
                    rc = dsi_error(DSI_EFORMAT, "logcnt[%d][%d] disagrees with phy2log", l, e);
        }
    }
    if (rc == DSI_OK) rc = dsi_eplb_placement_validate(out, 0, 0, 0);
    cJSON_Delete(root);
    if (rc != DSI_OK) dsi_eplb_placement_free(out);
    return rc;
}

int dsi_eplb_placement_load(const char *path, int E, int R, int P, int expect_layers, dsi_eplb_placement *out) {
    if (out) memset(out, 0, sizeof *out);
    char *buf;
    size_t len;
    int rc = slurp(path, &buf, &len);
    if (rc != DSI_OK) return rc;
    rc = dsi_eplb_placement_parse(buf, len, E, R, P, expect_layers, out);
    free(buf);
    return rc == DSI_OK ? rc : dsi_error_prefix(rc, "%s", path);
}
