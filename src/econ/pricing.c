/* Pricing file parser and pricing engine (time-of-day windows x utilisation
 * bands with hysteresis).
 *
 * A price is base[model][class] x window multiplier x band multiplier. Windows
 * are stored as UTC minutes of day so that evaluation is a modulo and a
 * compare; a window whose end is before its start wraps past midnight (in its
 * own zone, which is the same as wrapping in UTC after the shift). */
#include "econ/pricing_impl.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

const char *dsi_token_class_name(int cls) {
    switch (cls) {
    case DSI_TOK_INPUT_HIT: return "input_cache_hit";
    case DSI_TOK_INPUT_MISS: return "input_cache_miss";
    case DSI_TOK_OUTPUT: return "output";
    default: return "unknown";
    }
}

/* ---- parsing helpers --------------------------------------------------------- */

/* Every error message starts with the origin and the JSON path. */
#define PERR(code, ...) dsi_error_prefix(dsi_error(code, __VA_ARGS__), "%s", origin)

static int check_keys(const cJSON *obj, const char *const *allowed, const char *where, const char *origin) {
    if (!cJSON_IsObject(obj)) return PERR(DSI_EFORMAT, "%s: expected an object", where);
    const cJSON *it;
    cJSON_ArrayForEach(it, obj) {
        /* JSON leaves duplicate keys undefined and lookups here take the first,
         * so a price written twice would silently bill at the first one */
        for (const cJSON *prev = obj->child; prev != it; prev = prev->next)
            if (!strcmp(prev->string, it->string)) return PERR(DSI_EFORMAT, "%s: duplicate key '%s'", where, it->string);
        int ok = 0;
        for (int i = 0; allowed[i]; i++)
            if (!strcmp(it->string, allowed[i])) ok = 1;
        if (!ok) {
            char list[256] = "";
            for (int i = 0; allowed[i]; i++) {
                strncat(list, i ? ", " : "", sizeof list - strlen(list) - 1);
                strncat(list, allowed[i], sizeof list - strlen(list) - 1);
            }
            return PERR(DSI_EFORMAT, "%s: unknown key '%s' (expected one of: %s)", where, it->string, list);
        }
    }
    return DSI_OK;
}

/* Reads a finite number in [lo, hi]; `required`=0 leaves *v alone when absent. */
static int get_num(const cJSON *obj, const char *key, double lo, double hi, int required, double *v,
                   const char *where, const char *origin) {
    const cJSON *it = cJSON_GetObjectItemCaseSensitive(obj, key);
    if (!it) {
        if (required) return PERR(DSI_EFORMAT, "%s: missing '%s'", where, key);
        return DSI_OK;
    }
    if (!cJSON_IsNumber(it)) return PERR(DSI_EFORMAT, "%s.%s: expected a number", where, key);
    double x = it->valuedouble;
    if (!isfinite(x) || x < lo || x > hi)
        return PERR(DSI_EINVAL, "%s.%s: %g is out of range [%g, %g]", where, key, x, lo, hi);
    *v = x;
    return DSI_OK;
}

static int copy_name(char *dst, const char *src, const char *where, const char *origin) {
    size_t n = strlen(src);
    if (n == 0 || n >= DSI_PRICING_NAME_MAX)
        return PERR(DSI_EINVAL, "%s: name '%s' must have 1-%d characters", where, src, DSI_PRICING_NAME_MAX - 1);
    memcpy(dst, src, n + 1);
    return DSI_OK;
}

/* "HH:MM" with 00:00 <= t <= 24:00 -> minutes. */
static int parse_hhmm(const cJSON *obj, const char *key, int *min, const char *where, const char *origin) {
    const cJSON *it = cJSON_GetObjectItemCaseSensitive(obj, key);
    if (!it) return PERR(DSI_EFORMAT, "%s: missing '%s'", where, key);
    if (!cJSON_IsString(it)) return PERR(DSI_EFORMAT, "%s.%s: expected \"HH:MM\"", where, key);
    const char *s = it->valuestring;
    int h, m;
    char tail;
    if (strlen(s) != 5 || sscanf(s, "%2d:%2d%c", &h, &m, &tail) != 2 || s[2] != ':' || h < 0 || m < 0 ||
        m > 59 || h > 24 || (h == 24 && m != 0))
        return PERR(DSI_EINVAL, "%s.%s: '%s' is not a time of day HH:MM (00:00-24:00)", where, key, s);
    *min = h * 60 + m;
    return DSI_OK;
}

/* A multiplier is a number (every model) or an object {model: number}. Fills
 * mult[model] (1 and !applies where not given). */
static int parse_multiplier(const dsi_pricing *p, const cJSON *obj, double *mult, unsigned char *applies,
                            const char *where, const char *origin) {
    const cJSON *it = cJSON_GetObjectItemCaseSensitive(obj, "multiplier");
    for (int m = 0; m < p->n_models; m++) {
        mult[m] = 1.0;
        applies[m] = 0;
    }
    if (!it) return PERR(DSI_EFORMAT, "%s: missing 'multiplier'", where);
    if (cJSON_IsNumber(it)) {
        double x = it->valuedouble;
        if (!isfinite(x) || x <= 0 || x > 100)
            return PERR(DSI_EINVAL, "%s.multiplier: %g must be in (0, 100] (0.5 = 50%% off, 1.2 = +20%%)", where, x);
        for (int m = 0; m < p->n_models; m++) {
            mult[m] = x;
            applies[m] = 1;
        }
        return DSI_OK;
    }
    if (!cJSON_IsObject(it)) return PERR(DSI_EFORMAT, "%s.multiplier: expected a number or {model: number}", where);
    const cJSON *e;
    cJSON_ArrayForEach(e, it) {
        int m = dsi_pricing_find_model(p, e->string);
        if (m < 0) return PERR(DSI_EINVAL, "%s.multiplier: unknown model '%s'", where, e->string);
        if (applies[m])
            return PERR(DSI_EINVAL, "%s.multiplier: model '%s' given twice (by name or alias)", where, p->models[m].name);
        if (!cJSON_IsNumber(e) || !isfinite(e->valuedouble) || e->valuedouble <= 0 || e->valuedouble > 100)
            return PERR(DSI_EINVAL, "%s.multiplier.%s: must be a number in (0, 100]", where, e->string);
        mult[m] = e->valuedouble;
        applies[m] = 1;
    }
    return DSI_OK;
}

static int parse_models(dsi_pricing *p, const cJSON *models, const char *origin) {
    static const char *const keys[] = {"input_cache_hit", "input_cache_miss", "output", "aliases", NULL};
    if (!cJSON_IsObject(models) || !models->child)
        return PERR(DSI_EFORMAT, "models: expected a non-empty object {name: prices}");
    int n = cJSON_GetArraySize(models);
    p->models = calloc(n, sizeof *p->models);
    if (!p->models) return dsi_error(DSI_ENOMEM, "out of memory");
    const cJSON *mo;
    cJSON_ArrayForEach(mo, models) {
        char where[128];
        snprintf(where, sizeof where, "models.%.60s", mo->string);
        int rc = check_keys(mo, keys, where, origin);
        if (rc) return rc;
        econ_model *m = &p->models[p->n_models];
        if ((rc = copy_name(m->name, mo->string, where, origin))) return rc;
        if (dsi_pricing_find_model(p, m->name) >= 0) return PERR(DSI_EINVAL, "%s: duplicate model", where);
        for (int c = 0; c < DSI_TOK_N; c++)
            if ((rc = get_num(mo, dsi_token_class_name(c), 0, 1e6, 1, &m->base[c], where, origin))) return rc;
        const cJSON *al = cJSON_GetObjectItemCaseSensitive(mo, "aliases");
        if (al) {
            if (!cJSON_IsArray(al)) return PERR(DSI_EFORMAT, "%s.aliases: expected an array of strings", where);
            const cJSON *a;
            cJSON_ArrayForEach(a, al) {
                if (!cJSON_IsString(a)) return PERR(DSI_EFORMAT, "%s.aliases: expected strings", where);
                if (m->n_aliases >= ECON_MAX_ALIASES)
                    return PERR(DSI_EINVAL, "%s.aliases: at most %d", where, ECON_MAX_ALIASES);
                if (dsi_pricing_find_model(p, a->valuestring) >= 0)
                    return PERR(DSI_EINVAL, "%s.aliases: '%s' already names a model", where, a->valuestring);
                if ((rc = copy_name(m->aliases[m->n_aliases], a->valuestring, where, origin))) return rc;
                m->n_aliases++;
            }
        }
        p->n_models++;
    }
    return DSI_OK;
}

/* UTC intervals [a, b) in minutes of day of a window, split at midnight. */
static int window_intervals(const econ_window *w, int iv[2][2]) {
    int s = w->start_utc, e = w->end_utc;
    if (s < e) {
        iv[0][0] = s, iv[0][1] = e;
        return 1;
    }
    iv[0][0] = s, iv[0][1] = 1440;
    iv[1][0] = 0, iv[1][1] = e;
    return e > 0 ? 2 : 1;
}

static int windows_overlap(const econ_window *a, const econ_window *b) {
    int ia[2][2], ib[2][2];
    int na = window_intervals(a, ia), nb = window_intervals(b, ib);
    for (int i = 0; i < na; i++)
        for (int j = 0; j < nb; j++)
            if (ia[i][0] < ib[j][1] && ib[j][0] < ia[i][1]) return 1;
    return 0;
}

static int parse_windows(dsi_pricing *p, const cJSON *arr, const char *default_tz, const char *origin) {
    static const char *const keys[] = {"name", "start", "end", "timezone", "multiplier", NULL};
    if (!cJSON_IsArray(arr)) return PERR(DSI_EFORMAT, "windows: expected an array");
    int n = cJSON_GetArraySize(arr);
    if (n > 0) {
        p->windows = calloc(n, sizeof *p->windows);
        if (!p->windows) return dsi_error(DSI_ENOMEM, "out of memory");
    }
    const cJSON *wo;
    cJSON_ArrayForEach(wo, arr) {
        char where[64];
        snprintf(where, sizeof where, "windows[%d]", p->n_windows);
        int rc = check_keys(wo, keys, where, origin);
        if (rc) return rc;
        econ_window *w = &p->windows[p->n_windows];
        w->mult = calloc(p->n_models, sizeof *w->mult);
        w->applies = calloc(p->n_models, 1);
        if (!w->mult || !w->applies) return dsi_error(DSI_ENOMEM, "out of memory");
        p->n_windows++;
        const cJSON *nm = cJSON_GetObjectItemCaseSensitive(wo, "name");
        if (nm && !cJSON_IsString(nm)) return PERR(DSI_EFORMAT, "%s.name: expected a string", where);
        if ((rc = copy_name(w->name, nm ? nm->valuestring : where, where, origin))) return rc;
        int s, e;
        if ((rc = parse_hhmm(wo, "start", &s, where, origin))) return rc;
        if ((rc = parse_hhmm(wo, "end", &e, where, origin))) return rc;
        if (s % 1440 == e % 1440)
            return PERR(DSI_EINVAL, "%s: start and end are the same time of day (empty or whole-day window)", where);
        const cJSON *tz = cJSON_GetObjectItemCaseSensitive(wo, "timezone");
        const char *tzs = default_tz;
        if (tz) {
            if (!cJSON_IsString(tz)) return PERR(DSI_EFORMAT, "%s.timezone: expected a string", where);
            tzs = tz->valuestring;
        }
        if (dsi_econ_parse_tz(tzs, &w->tz_min) != DSI_OK) return dsi_error_prefix(DSI_EINVAL, "%s: %s", origin, where);
        w->start_local = s;
        w->end_local = e;
        w->start_utc = ((s - w->tz_min) % 1440 + 1440) % 1440;
        w->end_utc = ((e - w->tz_min) % 1440 + 1440) % 1440;
        if ((rc = parse_multiplier(p, wo, w->mult, w->applies, where, origin))) return rc;
    }
    for (int i = 0; i < p->n_windows; i++)
        for (int j = i + 1; j < p->n_windows; j++) {
            const econ_window *a = &p->windows[i], *b = &p->windows[j];
            int shared = -1;
            for (int m = 0; m < p->n_models && shared < 0; m++)
                if (a->applies[m] && b->applies[m]) shared = m;
            if (shared >= 0 && windows_overlap(a, b))
                return PERR(DSI_EINVAL, "windows[%d] '%s' and windows[%d] '%s' overlap for model '%s'", i, a->name, j,
                            b->name, p->models[shared].name);
        }
    return DSI_OK;
}

static int parse_bands(dsi_pricing *p, const cJSON *arr, const char *origin) {
    static const char *const keys[] = {"name", "min", "max", "multiplier", NULL};
    if (!cJSON_IsArray(arr)) return PERR(DSI_EFORMAT, "load_bands: expected an array");
    int n = cJSON_GetArraySize(arr);
    if (n > 0) {
        p->bands = calloc(n, sizeof *p->bands);
        if (!p->bands) return dsi_error(DSI_ENOMEM, "out of memory");
    }
    const cJSON *bo;
    cJSON_ArrayForEach(bo, arr) {
        char where[64];
        snprintf(where, sizeof where, "load_bands[%d]", p->n_bands);
        int rc = check_keys(bo, keys, where, origin);
        if (rc) return rc;
        econ_band *b = &p->bands[p->n_bands];
        b->mult = calloc(p->n_models, sizeof *b->mult);
        b->applies = calloc(p->n_models, 1);
        if (!b->mult || !b->applies) return dsi_error(DSI_ENOMEM, "out of memory");
        p->n_bands++;
        const cJSON *nm = cJSON_GetObjectItemCaseSensitive(bo, "name");
        if (nm && !cJSON_IsString(nm)) return PERR(DSI_EFORMAT, "%s.name: expected a string", where);
        if ((rc = copy_name(b->name, nm ? nm->valuestring : where, where, origin))) return rc;
        b->lo = 0;
        b->hi = INFINITY;
        if (!cJSON_GetObjectItemCaseSensitive(bo, "min") && !cJSON_GetObjectItemCaseSensitive(bo, "max"))
            return PERR(DSI_EFORMAT, "%s: needs 'min' and/or 'max' utilisation", where);
        if ((rc = get_num(bo, "min", 0, 10, 0, &b->lo, where, origin))) return rc;
        if ((rc = get_num(bo, "max", 0, 10, 0, &b->hi, where, origin))) return rc;
        if (!(b->lo < b->hi)) return PERR(DSI_EINVAL, "%s: min %g must be below max %g", where, b->lo, b->hi);
        if ((rc = parse_multiplier(p, bo, b->mult, b->applies, where, origin))) return rc;
    }
    for (int i = 0; i < p->n_bands; i++)
        for (int j = i + 1; j < p->n_bands; j++)
            if (p->bands[i].lo < p->bands[j].hi && p->bands[j].lo < p->bands[i].hi)
                return PERR(DSI_EINVAL, "load_bands[%d] '%s' and load_bands[%d] '%s' overlap", i, p->bands[i].name, j,
                            p->bands[j].name);
    return DSI_OK;
}

static int parse_root(dsi_pricing *p, const cJSON *root, const char *origin) {
    static const char *const keys[] = {"version", "currency", "timezone", "gpu", "paying_share", "models",
                                       "windows", "load_bands", "hysteresis", "min_hold_s", "comment", NULL};
    static const char *const gpu_keys[] = {"type", "cost_per_hour", "per_node", NULL};
    int rc = check_keys(root, keys, "(top level)", origin);
    if (rc) return rc;
    double version = 1;
    if ((rc = get_num(root, "version", 1, 1, 0, &version, "(top level)", origin))) return rc;
    const cJSON *cur = cJSON_GetObjectItemCaseSensitive(root, "currency");
    snprintf(p->currency, sizeof p->currency, "USD");
    if (cur) {
        if (!cJSON_IsString(cur) || strlen(cur->valuestring) != 3)
            return PERR(DSI_EINVAL, "currency: expected a 3-letter code such as \"USD\"");
        snprintf(p->currency, sizeof p->currency, "%s", cur->valuestring);
    }
    const char *tz = "UTC";
    const cJSON *tzo = cJSON_GetObjectItemCaseSensitive(root, "timezone");
    if (tzo) {
        if (!cJSON_IsString(tzo)) return PERR(DSI_EFORMAT, "timezone: expected a string");
        tz = tzo->valuestring;
        int off;
        if (dsi_econ_parse_tz(tz, &off) != DSI_OK) return dsi_error_prefix(DSI_EINVAL, "%s: timezone", origin);
    }
    p->gpu_cost_per_hour = 0;
    p->gpus_per_node = 8;
    snprintf(p->gpu_type, sizeof p->gpu_type, "H800");
    const cJSON *gpu = cJSON_GetObjectItemCaseSensitive(root, "gpu");
    if (gpu) {
        if ((rc = check_keys(gpu, gpu_keys, "gpu", origin))) return rc;
        if ((rc = get_num(gpu, "cost_per_hour", 0, 1e4, 1, &p->gpu_cost_per_hour, "gpu", origin))) return rc;
        double per_node = 8;
        if ((rc = get_num(gpu, "per_node", 1, 64, 0, &per_node, "gpu", origin))) return rc;
        if (per_node != floor(per_node)) return PERR(DSI_EINVAL, "gpu.per_node: must be a whole number");
        p->gpus_per_node = (int)per_node;
        const cJSON *ty = cJSON_GetObjectItemCaseSensitive(gpu, "type");
        if (ty) {
            if (!cJSON_IsString(ty)) return PERR(DSI_EFORMAT, "gpu.type: expected a string");
            snprintf(p->gpu_type, sizeof p->gpu_type, "%s", ty->valuestring);
        }
    }
    p->paying_share = 1.0;
    if ((rc = get_num(root, "paying_share", 0, 1, 0, &p->paying_share, "(top level)", origin))) return rc;
    p->hysteresis = 0.05;
    p->min_hold_s = 300;
    if ((rc = get_num(root, "hysteresis", 0, 1, 0, &p->hysteresis, "(top level)", origin))) return rc;
    if ((rc = get_num(root, "min_hold_s", 0, 86400, 0, &p->min_hold_s, "(top level)", origin))) return rc;
    const cJSON *models = cJSON_GetObjectItemCaseSensitive(root, "models");
    if (!models) return PERR(DSI_EFORMAT, "missing 'models'");
    if ((rc = parse_models(p, models, origin))) return rc;
    const cJSON *w = cJSON_GetObjectItemCaseSensitive(root, "windows");
    if (w && (rc = parse_windows(p, w, tz, origin))) return rc;
    const cJSON *b = cJSON_GetObjectItemCaseSensitive(root, "load_bands");
    if (b && (rc = parse_bands(p, b, origin))) return rc;
    return DSI_OK;
}

int dsi_pricing_parse(const char *json, const char *origin, dsi_pricing **out) {
    if (!json || !out) return dsi_error(DSI_EINVAL, "pricing: NULL argument");
    *out = NULL;
    if (!origin) origin = "pricing";
    const char *endp = NULL;
    cJSON *root = cJSON_ParseWithOpts(json, &endp, 1);
    if (!root) {
        size_t off = endp ? (size_t)(endp - json) : 0;
        int line = 1;
        for (size_t i = 0; i < off && json[i]; i++) line += json[i] == '\n';
        return dsi_error(DSI_EFORMAT, "%s: invalid JSON near line %d (byte %zu)", origin, line, off);
    }
    dsi_pricing *p = calloc(1, sizeof *p);
    if (!p) {
        cJSON_Delete(root);
        return dsi_error(DSI_ENOMEM, "out of memory");
    }
    pthread_mutex_init(&p->mu, NULL);
    p->band_state = -1;
    p->band_since = -INFINITY;
    int rc = parse_root(p, root, origin);
    cJSON_Delete(root);
    if (rc) {
        dsi_pricing_destroy(p);
        return rc;
    }
    *out = p;
    return DSI_OK;
}

int dsi_pricing_load(const char *path, dsi_pricing **out) {
    if (!path || !out) return dsi_error(DSI_EINVAL, "pricing: NULL argument");
    *out = NULL;
    FILE *f = fopen(path, "rb");
    if (!f) return dsi_error(DSI_EIO, "%s: cannot open: %s", path, strerror(errno));
    char *buf = NULL;
    size_t len = 0, cap = 0;
    for (;;) {
        if (len + 4096 + 1 > cap) {
            cap = cap ? cap * 2 : 8192;
            if (cap > (64u << 20)) {
                free(buf);
                fclose(f);
                return dsi_error(DSI_EFORMAT, "%s: larger than 64 MiB, not a pricing file", path);
            }
            char *nb = realloc(buf, cap);
            if (!nb) {
                free(buf);
                fclose(f);
                return dsi_error(DSI_ENOMEM, "out of memory");
            }
            buf = nb;
        }
        size_t n = fread(buf + len, 1, cap - len - 1, f);
        len += n;
        if (n == 0) break;
    }
    int err = ferror(f);
    fclose(f);
    if (err) {
        free(buf);
        return dsi_error(DSI_EIO, "%s: read failed", path);
    }
    buf[len] = '\0';
    if (strlen(buf) != len) {
        free(buf);
        return dsi_error(DSI_EFORMAT, "%s: contains NUL bytes, not a JSON pricing file", path);
    }
    int rc = dsi_pricing_parse(buf, path, out);
    free(buf);
    return rc;
}

void dsi_pricing_destroy(dsi_pricing *p) {
    if (!p) return;
    for (int i = 0; i < p->n_windows; i++) {
        free(p->windows[i].mult);
        free(p->windows[i].applies);
    }
    for (int i = 0; i < p->n_bands; i++) {
        free(p->bands[i].mult);
        free(p->bands[i].applies);
    }
    free(p->windows);
    free(p->bands);
    free(p->models);
    pthread_mutex_destroy(&p->mu);
    free(p);
}

/* ---- accessors --------------------------------------------------------------------- */

int dsi_pricing_n_models(const dsi_pricing *p) { return p ? p->n_models : 0; }

const char *dsi_pricing_model_name(const dsi_pricing *p, int i) {
    return p && i >= 0 && i < p->n_models ? p->models[i].name : NULL;
}

int dsi_pricing_find_model(const dsi_pricing *p, const char *name) {
    if (!p || !name) return -1;
    for (int i = 0; i < p->n_models; i++) {
        if (!strcmp(p->models[i].name, name)) return i;
        for (int a = 0; a < p->models[i].n_aliases; a++)
            if (!strcmp(p->models[i].aliases[a], name)) return i;
    }
    return -1;
}

int dsi_pricing_base(const dsi_pricing *p, int model, double usd[DSI_TOK_N]) {
    if (!p || !usd || model < 0 || model >= p->n_models) return dsi_error(DSI_EINVAL, "pricing: bad model index");
    for (int c = 0; c < DSI_TOK_N; c++) usd[c] = p->models[model].base[c];
    return DSI_OK;
}

double dsi_pricing_gpu_cost_per_hour(const dsi_pricing *p) { return p ? p->gpu_cost_per_hour : 0; }
int dsi_pricing_gpus_per_node(const dsi_pricing *p) { return p ? p->gpus_per_node : 0; }
double dsi_pricing_paying_share(const dsi_pricing *p) { return p ? p->paying_share : 0; }

double dsi_pricing_utilisation(double running, double capacity, double kv_used, double kv_total) {
    double u = 0;
    if (capacity > 0) u = running / capacity;
    if (kv_total > 0 && kv_used / kv_total > u) u = kv_used / kv_total;
    return u;
}

void dsi_pricing_reset_state(dsi_pricing *p) {
    if (!p) return;
    pthread_mutex_lock(&p->mu);
    p->band_state = -1;
    p->band_since = -INFINITY;
    pthread_mutex_unlock(&p->mu);
}

/* ---- evaluation ------------------------------------------------------------------------ */

static int window_active(const econ_window *w, double now) {
    double sod = fmod(now, 86400.0);
    if (sod < 0) sod += 86400.0;
    double s = w->start_utc * 60.0, e = w->end_utc * 60.0;
    if (s < e) return sod >= s && sod < e;
    return sod >= s || sod < e;
}

/* Most recent occurrence <= now (prev) and first occurrence > now (next) of a
 * UTC second-of-day boundary. */
static void boundary_times(double now, double sod_b, double *prev, double *next) {
    double day = floor(now / 86400.0) * 86400.0;
    double t = day + sod_b;
    if (t > now) {
        *next = t;
        *prev = t - 86400.0;
    } else {
        *prev = t;
        *next = t + 86400.0;
    }
}

int dsi__pricing_eval_window(const dsi_pricing *p, int model, double now) {
    for (int i = 0; i < p->n_windows; i++)
        if (p->windows[i].applies[model] && window_active(&p->windows[i], now)) return i;
    return -1;
}

int dsi_pricing_eval(const dsi_pricing *p, int model, double now, int band, dsi_price_quote *q) {
    if (!p || !q || model < 0 || model >= p->n_models || band < -1 || band >= p->n_bands || !isfinite(now))
        return dsi_error(DSI_EINVAL, "pricing eval: bad argument");
    memset(q, 0, sizeof *q);
    q->model = model;
    q->quoted_at = now;
    snprintf(q->model_name, sizeof q->model_name, "%s", p->models[model].name);
    int w = dsi__pricing_eval_window(p, model, now);
    double mw = w >= 0 ? p->windows[w].mult[model] : 1.0;
    double mb = band >= 0 && p->bands[band].applies[model] ? p->bands[band].mult[model] : 1.0;
    q->window = w;
    q->band = band >= 0 && p->bands[band].applies[model] ? band : -1;
    if (w >= 0) snprintf(q->window_name, sizeof q->window_name, "%s", p->windows[w].name);
    if (q->band >= 0) snprintf(q->band_name, sizeof q->band_name, "%s", p->bands[band].name);
    q->multiplier = mw * mb;
    for (int c = 0; c < DSI_TOK_N; c++) q->usd_per_mtok[c] = p->models[model].base[c] * q->multiplier;
    double last = -INFINITY, next = INFINITY;
    for (int i = 0; i < p->n_windows; i++) {
        if (!p->windows[i].applies[model]) continue;
        double b[2] = {p->windows[i].start_utc * 60.0, p->windows[i].end_utc * 60.0};
        for (int k = 0; k < 2; k++) {
            double pv, nx;
            boundary_times(now, b[k], &pv, &nx);
            if (pv > last) last = pv;
            if (nx < next) next = nx;
        }
    }
    q->effective_from = last;
    q->next_change = next;
    if (isfinite(next)) {
        int w2 = dsi__pricing_eval_window(p, model, next);
        double m2 = (w2 >= 0 ? p->windows[w2].mult[model] : 1.0) * mb;
        for (int c = 0; c < DSI_TOK_N; c++) q->next_usd_per_mtok[c] = p->models[model].base[c] * m2;
    } else {
        for (int c = 0; c < DSI_TOK_N; c++) q->next_usd_per_mtok[c] = q->usd_per_mtok[c];
    }
    return DSI_OK;
}

/* The band state machine; caller holds p->mu. */
static void band_update(dsi_pricing *p, double now, double u) {
    if (u < 0 || !isfinite(u) || p->n_bands == 0) return;
    if (now < p->band_since) return; /* late caller: never move state backwards */
    int cur = p->band_state;
    double h = p->hysteresis;
    if (cur >= 0 && u >= p->bands[cur].lo - h && u < p->bands[cur].hi + h) return;
    int target = -1;
    for (int i = 0; i < p->n_bands; i++)
        if (u >= p->bands[i].lo && u < p->bands[i].hi) target = i;
    if (target == cur) return;
    if (isfinite(p->band_since) && now - p->band_since < p->min_hold_s) return;
    p->band_state = target;
    p->band_since = now;
}

int dsi__pricing_step(dsi_pricing *p, double now, double utilisation, int *band, double *since) {
    pthread_mutex_lock(&p->mu);
    band_update(p, now, utilisation);
    *band = p->band_state;
    *since = p->band_since;
    pthread_mutex_unlock(&p->mu);
    return DSI_OK;
}

int dsi_pricing_current(dsi_pricing *p, const char *model, double now, double utilisation, dsi_price_quote *q) {
    if (!p || !model || !q) return dsi_error(DSI_EINVAL, "pricing: NULL argument");
    int m = dsi_pricing_find_model(p, model);
    if (m < 0) return dsi_error(DSI_ENOTFOUND, "pricing: unknown model '%s'", model);
    if (!isfinite(now)) return dsi_error(DSI_EINVAL, "pricing: bad time");
    int band;
    double since;
    dsi__pricing_step(p, now, utilisation, &band, &since);
    int rc = dsi_pricing_eval(p, m, now, band, q);
    if (rc) return rc;
    /* A band change (entering or leaving) is a price change too. */
    if (isfinite(since) && since > q->effective_from) q->effective_from = since;
    return DSI_OK;
}

/* ---- GET /v1/pricing body ---------------------------------------------------------------- */

void dsi__ebuf_printf(dsi_ebuf *s, const char *fmt, ...) {
    if (s->overflow) return;
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(s->buf + s->len, s->cap - s->len, fmt, ap);
    va_end(ap);
    if (n < 0 || (size_t)n >= s->cap - s->len) {
        s->overflow = 1;
        return;
    }
    s->len += n;
}

/* Names come from our own validated file, but escape anyway: a quote in a
 * model name must not break the JSON. */
static void sb_str(dsi_ebuf *s, const char *str) {
    dsi__ebuf_printf(s, "\"");
    for (const unsigned char *c = (const unsigned char *)str; *c; c++) {
        if (*c == '"' || *c == '\\') dsi__ebuf_printf(s, "\\%c", *c);
        else if (*c < 0x20) dsi__ebuf_printf(s, "\\u%04x", *c);
        else dsi__ebuf_printf(s, "%c", *c);
    }
    dsi__ebuf_printf(s, "\"");
}

static void sb_prices(dsi_ebuf *s, const double *usd) {
    dsi__ebuf_printf(s, "{");
    for (int c = 0; c < DSI_TOK_N; c++)
        dsi__ebuf_printf(s, "%s\"%s\":%.10g", c ? "," : "", dsi_token_class_name(c), usd[c]);
    dsi__ebuf_printf(s, "}");
}

char *dsi__econ_text(int (*fill)(void *ctx, char *buf, size_t cap), void *ctx, int *len) {
    for (size_t cap = (size_t)16 << 10; cap <= (size_t)4 << 20; cap *= 16) {
        char *buf = malloc(cap);
        if (!buf) break;
        int n = fill(ctx, buf, cap);
        if (n >= 0) { *len = n; return buf; }
        free(buf);
        if (n != DSI_ERANGE) return NULL;
    }
    dsi_error(DSI_ENOMEM, "economics text: out of memory or over 4 MiB");
    return NULL;
}

typedef struct { dsi_pricing *p; double now, util; } json_args;
static int fill_json(void *ctx, char *buf, size_t cap) {
    json_args *a = ctx;
    return dsi_pricing_write_json(a->p, a->now, a->util, buf, cap);
}

char *dsi_pricing_json_text(dsi_pricing *p, double now, double utilisation, int *len) {
    json_args a = {p, now, utilisation};
    return dsi__econ_text(fill_json, &a, len);
}

int dsi_pricing_write_json(dsi_pricing *p, double now, double utilisation, char *buf, size_t cap) {
    if (!p || !buf || cap == 0) return dsi_error(DSI_EINVAL, "pricing: NULL argument");
    dsi_ebuf s = {buf, cap, 0, 0};
    char t[40];
    dsi_econ_format_time(now, t, sizeof t);
    dsi__ebuf_printf(&s, "{\"object\":\"pricing\",\"time\":\"%s\",\"currency\":\"%s\",\"unit\":\"per 1M tokens\"", t,
              p->currency);
    if (utilisation >= 0) dsi__ebuf_printf(&s, ",\"utilisation\":%.4f", utilisation);
    dsi__ebuf_printf(&s, ",\"models\":[");
    for (int m = 0; m < p->n_models; m++) {
        dsi_price_quote q;
        int rc = dsi_pricing_current(p, p->models[m].name, now, m == 0 ? utilisation : -1, &q);
        if (rc) return rc;
        dsi__ebuf_printf(&s, "%s{\"model\":", m ? "," : "");
        sb_str(&s, q.model_name);
        dsi__ebuf_printf(&s, ",\"prices\":");
        sb_prices(&s, q.usd_per_mtok);
        dsi__ebuf_printf(&s, ",\"multiplier\":%.10g,\"window\":", q.multiplier);
        if (q.window >= 0) sb_str(&s, q.window_name);
        else dsi__ebuf_printf(&s, "null");
        dsi__ebuf_printf(&s, ",\"band\":");
        if (q.band >= 0) sb_str(&s, q.band_name);
        else dsi__ebuf_printf(&s, "null");
        dsi_econ_format_time(q.effective_from, t, sizeof t);
        dsi__ebuf_printf(&s, ",\"effective_from\":\"%s\",\"next_change\":", t);
        if (isfinite(q.next_change)) {
            dsi_econ_format_time(q.next_change, t, sizeof t);
            dsi__ebuf_printf(&s, "{\"at\":\"%s\",\"prices\":", t);
            sb_prices(&s, q.next_usd_per_mtok);
            dsi__ebuf_printf(&s, "}");
        } else {
            dsi__ebuf_printf(&s, "null");
        }
        dsi__ebuf_printf(&s, "}");
    }
    dsi__ebuf_printf(&s, "]}");
    if (s.overflow) return dsi_error(DSI_ERANGE, "pricing: output buffer of %zu bytes too small", cap);
    return (int)s.len;
}

int dsi_price_quote_write_json(const dsi_price_quote *q, char *buf, size_t cap) {
    if (!q || !buf || cap == 0) return dsi_error(DSI_EINVAL, "quote: NULL argument");
    dsi_ebuf s = {buf, cap, 0, 0};
    char t[40];
    dsi__ebuf_printf(&s, "{\"model\":");
    sb_str(&s, q->model_name);
    dsi__ebuf_printf(&s, ",\"unit\":\"per 1M tokens\",\"prices\":");
    sb_prices(&s, q->usd_per_mtok);
    dsi__ebuf_printf(&s, ",\"multiplier\":%.10g,\"window\":", q->multiplier);
    if (q->window >= 0) sb_str(&s, q->window_name);
    else dsi__ebuf_printf(&s, "null");
    dsi__ebuf_printf(&s, ",\"band\":");
    if (q->band >= 0) sb_str(&s, q->band_name);
    else dsi__ebuf_printf(&s, "null");
    dsi_econ_format_time(q->quoted_at, t, sizeof t);
    dsi__ebuf_printf(&s, ",\"quoted_at\":\"%s\"}", t);
    if (s.overflow) return dsi_error(DSI_ERANGE, "quote: output buffer of %zu bytes too small", cap);
    return (int)s.len;
}
