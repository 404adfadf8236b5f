/* safetensors reader (mmap, sharded) and writer. Every offset in a header is
 * untrusted: it is checked against the file size before any view is made. */
#include "dsinfer/safetensors.h"

#include <cjson/cJSON.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

static const struct { const char *name; size_t size; } DTYPES[DSI_DTYPE_COUNT] = {
    [DSI_F32] = {"F32", 4},   [DSI_F16] = {"F16", 2},         [DSI_BF16] = {"BF16", 2},
    [DSI_F8_E4M3] = {"F8_E4M3", 1}, [DSI_F64] = {"F64", 8}, [DSI_I32] = {"I32", 4},
    [DSI_I64] = {"I64", 8},   [DSI_U8] = {"U8", 1},
};

const char *dsi_dtype_name(dsi_dtype t) { return (unsigned)t < DSI_DTYPE_COUNT ? DTYPES[t].name : "?"; }
size_t dsi_dtype_size(dsi_dtype t) { return (unsigned)t < DSI_DTYPE_COUNT ? DTYPES[t].size : 0; }

static int dtype_parse(const char *s, dsi_dtype *out) {
    for (int i = 0; i < DSI_DTYPE_COUNT; i++)
        if (!strcmp(s, DTYPES[i].name)) { *out = (dsi_dtype)i; return 1; }
    return 0;
}

/* One mapped (or borrowed) file. */
typedef struct st_file {
    char *path;
    const uint8_t *base;
    size_t len;
    int mapped;
} st_file;

struct dsi_st_set {
    st_file *files;
    int n_files, cap_files;
    dsi_tensor *tensors;
    int n_tensors, cap_tensors;
    int *table;          /* open-addressing hash of tensor indices, -1 empty */
    size_t table_size;   /* power of two */
    size_t total_bytes;
};

static uint64_t hash_str(const char *s) {
    uint64_t h = 1469598103934665603ull;
    for (; *s; s++) h = (h ^ (uint8_t)*s) * 1099511628211ull;
    return h;
}

static int table_rebuild(dsi_st_set *set) {
    size_t size = 16;
    while (size < (size_t)set->n_tensors * 2 + 1) size <<= 1;
    int *t = malloc(size * sizeof(int));
    if (!t) return dsi_error(DSI_ENOMEM, "out of memory for tensor index");
    memset(t, 0xff, size * sizeof(int));
    for (int i = 0; i < set->n_tensors; i++) {
        size_t h = hash_str(set->tensors[i].name) & (size - 1);
        while (t[h] >= 0) {
            if (!strcmp(set->tensors[t[h]].name, set->tensors[i].name)) {
                int first = t[h]; /* read before t is freed */
                free(t);
                return dsi_error(DSI_EFORMAT, "tensor '%s' appears twice (%s and %s)",
                                 set->tensors[i].name, set->tensors[first].file, set->tensors[i].file);
            }
            h = (h + 1) & (size - 1);
        }
        t[h] = i;
    }
    free(set->table);
    set->table = t;
    set->table_size = size;
    return DSI_OK;
}

const dsi_tensor *dsi_st_find(const dsi_st_set *set, const char *name) {
    if (!set || !set->table) return NULL;
    size_t h = hash_str(name) & (set->table_size - 1);
    while (set->table[h] >= 0) {
        const dsi_tensor *t = &set->tensors[set->table[h]];
        if (!strcmp(t->name, name)) return t;
        h = (h + 1) & (set->table_size - 1);
    }
    return NULL;
}

int dsi_st_count(const dsi_st_set *set) { return set ? set->n_tensors : 0; }
const dsi_tensor *dsi_st_at(const dsi_st_set *set, int i) {
    return set && i >= 0 && i < set->n_tensors ? &set->tensors[i] : NULL;
}
size_t dsi_st_total_bytes(const dsi_st_set *set) { return set ? set->total_bytes : 0; }

void dsi_st_close(dsi_st_set *set) {
    if (!set) return;
    for (int i = 0; i < set->n_tensors; i++) free((char *)set->tensors[i].name);
    for (int i = 0; i < set->n_files; i++) {
        if (set->files[i].mapped && set->files[i].len) munmap((void *)set->files[i].base, set->files[i].len);
        free(set->files[i].path);
    }
    free(set->files);
    free(set->tensors);
    free(set->table);
    free(set);
}

static int push_tensor(dsi_st_set *set, const dsi_tensor *t) {
    if (set->n_tensors == set->cap_tensors) {
        int cap = set->cap_tensors ? set->cap_tensors * 2 : 256;
        dsi_tensor *n = realloc(set->tensors, cap * sizeof *n);
        if (!n) return dsi_error(DSI_ENOMEM, "out of memory for tensor list");
        set->tensors = n;
        set->cap_tensors = cap;
    }
    set->tensors[set->n_tensors++] = *t;
    return DSI_OK;
}

static int push_file(dsi_st_set *set, const char *path, const uint8_t *base, size_t len, int mapped) {
    if (set->n_files == set->cap_files) {
        int cap = set->cap_files ? set->cap_files * 2 : 8;
        st_file *n = realloc(set->files, cap * sizeof *n);
        if (!n) return dsi_error(DSI_ENOMEM, "out of memory");
        set->files = n;
        set->cap_files = cap;
    }
    st_file *f = &set->files[set->n_files];
    f->path = strdup(path);
    if (!f->path) return dsi_error(DSI_ENOMEM, "out of memory");
    f->base = base;
    f->len = len;
    f->mapped = mapped;
    set->n_files++;
    return DSI_OK;
}

#define MAX_HEADER_BYTES (256u << 20)

/* Offset of the first byte that breaks UTF-8 (overlong forms, surrogates and
 * code points past U+10FFFF included), or n if [s, s+n) is valid. */
static size_t utf8_invalid_at(const uint8_t *s, size_t n) {
    size_t i = 0;
    while (i < n) {
        uint8_t c = s[i];
        if (c < 0x80) { i++; continue; }
        size_t k;
        uint32_t cp, min;
        if ((c & 0xe0) == 0xc0) { k = 1; cp = c & 0x1f; min = 0x80; }
        else if ((c & 0xf0) == 0xe0) { k = 2; cp = c & 0x0f; min = 0x800; }
        else if ((c & 0xf8) == 0xf0) { k = 3; cp = c & 0x07; min = 0x10000; }
        else return i;
        if (n - i <= k) return i;
        for (size_t j = 1; j <= k; j++) {
            if ((s[i + j] & 0xc0) != 0x80) return i;
            cp = (cp << 6) | (s[i + j] & 0x3f);
        }
        if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) return i;
        i += k + 1;
    }
    return n;
}

/* Parses the header of files[fi] and appends its tensors. */
static int parse_file(dsi_st_set *set, int fi) {
    const st_file *f = &set->files[fi];
    const char *fname = f->path;
    if (f->len < 8) return dsi_error(DSI_EFORMAT, "%s: file is %zu bytes, shorter than the 8-byte header length", fname, f->len);
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--) hlen = (hlen << 8) | f->base[i];
    if (hlen > f->len - 8)
        return dsi_error(DSI_EFORMAT, "%s: header length %llu exceeds file size %zu (truncated file?)", fname,
                         (unsigned long long)hlen, f->len);
    if (hlen > MAX_HEADER_BYTES || hlen < 2)
        return dsi_error(DSI_EFORMAT, "%s: implausible header length %llu", fname, (unsigned long long)hlen);
    /* The header is UTF-8 JSON (the format's rule): raw bytes would otherwise
     * reach tensor names and every message that quotes them. */
    size_t bad_at = utf8_invalid_at(f->base + 8, (size_t)hlen);
    if (bad_at < hlen)
        return dsi_error(DSI_EFORMAT, "%s: header is not valid UTF-8 (byte %zu)", fname, bad_at + 8);
    const char *end = NULL;
    cJSON *root = cJSON_ParseWithLengthOpts((const char *)f->base + 8, (size_t)hlen, &end, 0);
    if (!root || !cJSON_IsObject(root)) {
        cJSON_Delete(root);
        return dsi_error(DSI_EFORMAT, "%s: header is not a JSON object", fname);
    }
    /* only whitespace padding may follow the object (as the reference reader demands) */
    for (const char *p = end; p < (const char *)f->base + 8 + hlen; p++)
        if (*p != ' ' && *p != '\t' && *p != '\n' && *p != '\r') {
            cJSON_Delete(root);
            return dsi_error(DSI_EFORMAT, "%s: junk after the header's JSON object (byte %zu)", fname,
                             (size_t)(p - (const char *)f->base));
        }
    const uint8_t *data = f->base + 8 + hlen;
    size_t data_len = f->len - 8 - hlen;
    int rc = DSI_OK;
    for (cJSON *e = root->child; e; e = e->next) {
        if (!e->string) { rc = dsi_error(DSI_EFORMAT, "%s: header entry without a name", fname); break; }
        if (!strcmp(e->string, "__metadata__")) continue;
        const char *tn = e->string;
        cJSON *jd = cJSON_GetObjectItemCaseSensitive(e, "dtype");
        cJSON *js = cJSON_GetObjectItemCaseSensitive(e, "shape");
        cJSON *jo = cJSON_GetObjectItemCaseSensitive(e, "data_offsets");
        if (!cJSON_IsObject(e) || !cJSON_IsString(jd) || !cJSON_IsArray(js) || !cJSON_IsArray(jo) ||
            cJSON_GetArraySize(jo) != 2) {
            rc = dsi_error(DSI_EFORMAT, "%s: tensor '%s': needs dtype, shape and data_offsets[2]", fname, tn);
            break;
        }
        dsi_tensor t = {0};
        if (!dtype_parse(jd->valuestring, &t.dtype)) {
            rc = dsi_error(DSI_EUNSUPPORTED, "%s: tensor '%s': unsupported dtype '%s'", fname, tn, jd->valuestring);
            break;
        }
        int nd = cJSON_GetArraySize(js);
        if (nd > DSI_MAX_DIMS) {
            rc = dsi_error(DSI_EUNSUPPORTED, "%s: tensor '%s': %d dimensions (max %d)", fname, tn, nd, DSI_MAX_DIMS);
            break;
        }
        t.n_dims = nd;
        unsigned __int128 numel = 1;
        int bad = 0;
        for (int d = 0; d < nd; d++) {
            cJSON *x = cJSON_GetArrayItem(js, d);
            if (!cJSON_IsNumber(x) || x->valuedouble < 0 || x->valuedouble > 9.0e15 ||
                x->valuedouble != (double)(int64_t)x->valuedouble) { bad = 1; break; }
            t.shape[d] = (int64_t)x->valuedouble;
            numel *= (uint64_t)t.shape[d];
            if (numel > ((unsigned __int128)1 << 62)) { bad = 1; break; }
        }
        if (bad) { rc = dsi_error(DSI_EFORMAT, "%s: tensor '%s': bad shape", fname, tn); break; }
        cJSON *b = cJSON_GetArrayItem(jo, 0), *en = cJSON_GetArrayItem(jo, 1);
        if (!cJSON_IsNumber(b) || !cJSON_IsNumber(en) || b->valuedouble < 0 || en->valuedouble < b->valuedouble ||
            en->valuedouble > (double)data_len || b->valuedouble != (double)(uint64_t)b->valuedouble ||
            en->valuedouble != (double)(uint64_t)en->valuedouble) {
            rc = dsi_error(DSI_ERANGE, "%s: tensor '%s': data_offsets out of range (data section is %zu bytes; truncated file?)",
                           fname, tn, data_len);
            break;
        }
        uint64_t ob = (uint64_t)b->valuedouble, oe = (uint64_t)en->valuedouble;
        if ((unsigned __int128)(oe - ob) != numel * dsi_dtype_size(t.dtype)) {
            rc = dsi_error(DSI_EFORMAT, "%s: tensor '%s': %llu bytes for a %s tensor of %llu elements", fname, tn,
                           (unsigned long long)(oe - ob), dsi_dtype_name(t.dtype), (unsigned long long)numel);
            break;
        }
        t.data = data + ob;
        t.size_bytes = oe - ob;
        t.file = f->path;
        t.name = strdup(tn);
        if (!t.name) { rc = dsi_error(DSI_ENOMEM, "out of memory"); break; }
        if ((rc = push_tensor(set, &t)) != DSI_OK) { free((char *)t.name); break; }
        set->total_bytes += t.size_bytes;
    }
    cJSON_Delete(root);
    return rc;
}

int dsi_st_open_memory(const void *buf, size_t len, const char *name, dsi_st_set **out) {
    *out = NULL;
    dsi_st_set *set = calloc(1, sizeof *set);
    if (!set) return dsi_error(DSI_ENOMEM, "out of memory");
    int rc = push_file(set, name ? name : "<memory>", buf, len, 0);
    if (rc == DSI_OK) rc = parse_file(set, 0);
    if (rc == DSI_OK) rc = table_rebuild(set);
    if (rc != DSI_OK) { dsi_st_close(set); return rc; }
    *out = set;
    return DSI_OK;
}

static int map_file(dsi_st_set *set, const char *path) {
    /* O_NONBLOCK: opening a FIFO named *.safetensors would otherwise wait
     * forever for a writer; the regular-file check below then rejects it */
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) return dsi_error(errno == ENOENT ? DSI_ENOTFOUND : DSI_EIO, "%s: %s", path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        close(fd);
        return dsi_error(DSI_EIO, "%s: not a regular file", path);
    }
    size_t len = (size_t)st.st_size;
    void *base = NULL;
    if (len > 0) {
        base = mmap(NULL, len, PROT_READ, MAP_PRIVATE, fd, 0);
        if (base == MAP_FAILED) {
            int e = errno;
            close(fd);
            return dsi_error(DSI_EIO, "%s: mmap failed: %s", path, strerror(e));
        }
    }
    close(fd);
    int rc = push_file(set, path, base, len, 1);
    if (rc != DSI_OK && base) munmap(base, len);
    return rc;
}

int dsi_st_open_file(const char *path, dsi_st_set **out) {
    *out = NULL;
    dsi_st_set *set = calloc(1, sizeof *set);
    if (!set) return dsi_error(DSI_ENOMEM, "out of memory");
    int rc = map_file(set, path);
    if (rc == DSI_OK) rc = parse_file(set, 0);
    if (rc == DSI_OK) rc = table_rebuild(set);
    if (rc != DSI_OK) { dsi_st_close(set); return rc; }
    *out = set;
    return DSI_OK;
}

static char *read_small_file(const char *path, size_t max, size_t *len_out) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    char *buf = malloc(max + 1);
    size_t n = buf ? fread(buf, 1, max, f) : 0;
    fclose(f);
    if (!buf) return NULL;
    buf[n] = 0;
    if (len_out) *len_out = n;
    return buf;
}

static int cmp_str(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

int dsi_st_open_dir(const char *dir, dsi_st_set **out) {
    *out = NULL;
    char path[4096];
    dsi_st_set *set = calloc(1, sizeof *set);
    if (!set) return dsi_error(DSI_ENOMEM, "out of memory");
    int rc = DSI_OK;
    snprintf(path, sizeof path, "%s/model.safetensors.index.json", dir);
    size_t ilen = 0;
    struct stat ist;
    int has_index = stat(path, &ist) == 0;
    if (has_index && !S_ISREG(ist.st_mode)) { /* a FIFO would block fopen */
        dsi_st_close(set);
        return dsi_error(DSI_EIO, "%s: not a regular file", path);
    }
    if (has_index && ist.st_size > (off_t)(64u << 20)) { /* it would be cut short */
        dsi_st_close(set);
        return dsi_error(DSI_EFORMAT, "%s: %lld bytes, over the 64 MiB an index may have", path, (long long)ist.st_size);
    }
    char *index = read_small_file(path, 64u << 20, &ilen);
    if (has_index && !index) { /* not "no index": that would load every *.safetensors here instead */
        int e = errno;
        dsi_st_close(set);
        return dsi_error(DSI_EIO, "%s: %s", path, strerror(e));
    }
    cJSON *iroot = NULL;
    if (index) {
        iroot = cJSON_ParseWithLength(index, ilen);
        cJSON *wm = cJSON_GetObjectItemCaseSensitive(iroot, "weight_map");
        if (!cJSON_IsObject(wm)) {
            rc = dsi_error(DSI_EFORMAT, "%s: no weight_map object", path);
            goto done;
        }
        /* distinct shard names, sorted for a stable order */
        int n = cJSON_GetArraySize(wm), nu = 0;
        char **names = calloc(n ? n : 1, sizeof(char *));
        if (!names) { rc = dsi_error(DSI_ENOMEM, "out of memory"); goto done; }
        for (cJSON *e = wm->child; e; e = e->next) {
            if (!cJSON_IsString(e) || strchr(e->valuestring, '/') || !strcmp(e->valuestring, "..")) {
                free(names);
                rc = dsi_error(DSI_EFORMAT, "%s: bad shard name for tensor '%s'", path, e->string ? e->string : "?");
                goto done;
            }
            names[nu++] = e->valuestring;
        }
        qsort(names, nu, sizeof(char *), cmp_str);
        int k = 0;
        for (int i = 0; i < nu; i++)
            if (i == 0 || strcmp(names[i], names[i - 1])) names[k++] = names[i];
        for (int i = 0; i < k && rc == DSI_OK; i++) {
            snprintf(path, sizeof path, "%s/%s", dir, names[i]);
            DSI_LOG_DEBUG("mapping shard %d/%d %s", i + 1, k, names[i]);
            rc = map_file(set, path);
            if (rc == DSI_OK) rc = parse_file(set, set->n_files - 1);
        }
        free(names);
        if (rc == DSI_OK) rc = table_rebuild(set);
        /* every indexed tensor must exist, in the shard the index names */
        for (cJSON *e = wm->child; e && rc == DSI_OK; e = e->next) {
            const dsi_tensor *t = dsi_st_find(set, e->string);
            if (!t) {
                rc = dsi_error(DSI_ENOTFOUND, "tensor '%s' listed in the index is missing from %s", e->string,
                               e->valuestring);
            } else {
                const char *base = strrchr(t->file, '/');
                base = base ? base + 1 : t->file;
                if (strcmp(base, e->valuestring))
                    rc = dsi_error(DSI_EFORMAT, "tensor '%s': index says %s, found in %s", e->string, e->valuestring, base);
            }
        }
    } else {
        snprintf(path, sizeof path, "%s/model.safetensors", dir);
        if (access(path, R_OK) == 0) {
            rc = map_file(set, path);
            if (rc == DSI_OK) rc = parse_file(set, 0);
        } else {
            DIR *d = opendir(dir);
            if (!d) { rc = dsi_error(DSI_ENOTFOUND, "%s: %s", dir, strerror(errno)); goto done; }
            char **names = NULL;
            int nn = 0, cap = 0;
            struct dirent *de;
            while ((de = readdir(d)) && rc == DSI_OK) {
                size_t l = strlen(de->d_name);
                if (l > 12 && !strcmp(de->d_name + l - 12, ".safetensors")) {
                    if (nn == cap) {
                        char **g = realloc(names, (cap ? cap * 2 : 16) * sizeof *names);
                        if (!g) { rc = dsi_error(DSI_ENOMEM, "out of memory"); break; }
                        names = g;
                        cap = cap ? cap * 2 : 16;
                    }
                    if (!(names[nn] = strdup(de->d_name))) { rc = dsi_error(DSI_ENOMEM, "out of memory"); break; }
                    nn++;
                }
            }
            closedir(d);
            if (nn == 0 && rc == DSI_OK) rc = dsi_error(DSI_ENOTFOUND, "%s: no .safetensors files", dir);
            if (nn > 0) qsort(names, nn, sizeof(char *), cmp_str); /* qsort(NULL, 0) is undefined */
            for (int i = 0; i < nn; i++) {
                if (rc == DSI_OK) {
                    snprintf(path, sizeof path, "%s/%s", dir, names[i]);
                    rc = map_file(set, path);
                    if (rc == DSI_OK) rc = parse_file(set, set->n_files - 1);
                }
                free(names[i]);
            }
            free(names);
        }
        if (rc == DSI_OK) rc = table_rebuild(set);
    }
done:
    cJSON_Delete(iroot);
    free(index);
    if (rc != DSI_OK) { dsi_st_close(set); return rc; }
    *out = set;
    return DSI_OK;
}

/* ---------------------------------------------------------------- writer */

typedef struct w_entry {
    char *name;
    dsi_dtype dtype;
    int n_dims;
    int64_t shape[DSI_MAX_DIMS];
    void *data;
    size_t size;
} w_entry;

struct dsi_st_writer {
    w_entry *e;
    int n, cap;
    size_t bytes;
};

dsi_st_writer *dsi_st_writer_create(void) { return calloc(1, sizeof(dsi_st_writer)); }

void dsi_st_writer_destroy(dsi_st_writer *w) {
    if (!w) return;
    for (int i = 0; i < w->n; i++) { free(w->e[i].name); free(w->e[i].data); }
    free(w->e);
    free(w);
}

int dsi_st_writer_add(dsi_st_writer *w, const char *name, dsi_dtype dtype, int n_dims, const int64_t *shape,
                      const void *data) {
    if (!name) return dsi_error(DSI_EINVAL, "tensor without a name");
    if (n_dims < 0 || n_dims > DSI_MAX_DIMS) return dsi_error(DSI_EINVAL, "%s: bad rank %d", name, n_dims);
    if ((unsigned)dtype >= DSI_DTYPE_COUNT) return dsi_error(DSI_EINVAL, "%s: bad dtype %d", name, (int)dtype);
    /* a negative or overflowing shape would otherwise wrap the byte count and
     * write a header that no reader accepts (or copy past `data`) */
    unsigned __int128 check = dsi_dtype_size(dtype);
    for (int d = 0; d < n_dims; d++) {
        if (shape[d] < 0) return dsi_error(DSI_EINVAL, "%s: negative dimension %lld", name, (long long)shape[d]);
        check *= (uint64_t)shape[d];
        if (check > ((unsigned __int128)1 << 62)) return dsi_error(DSI_EINVAL, "%s: tensor too large", name);
    }
    if (check && !data) return dsi_error(DSI_EINVAL, "%s: no data", name);
    if (w->n == w->cap) {
        int cap = w->cap ? w->cap * 2 : 64;
        w_entry *n = realloc(w->e, cap * sizeof *n);
        if (!n) return dsi_error(DSI_ENOMEM, "out of memory");
        w->e = n;
        w->cap = cap;
    }
    w_entry *e = &w->e[w->n];
    memset(e, 0, sizeof *e);
    size_t numel = 1;
    for (int d = 0; d < n_dims; d++) { e->shape[d] = shape[d]; numel *= (size_t)shape[d]; }
    e->n_dims = n_dims;
    e->dtype = dtype;
    e->size = numel * dsi_dtype_size(dtype);
    e->name = strdup(name);
    e->data = malloc(e->size ? e->size : 1);
    if (!e->name || !e->data) { free(e->name); free(e->data); return dsi_error(DSI_ENOMEM, "out of memory"); }
    if (e->size) memcpy(e->data, data, e->size); /* data may be NULL for an empty tensor */
    w->bytes += e->size;
    w->n++;
    return DSI_OK;
}

size_t dsi_st_writer_bytes(const dsi_st_writer *w) { return w->bytes; }
int dsi_st_writer_count(const dsi_st_writer *w) { return w->n; }
const char *dsi_st_writer_name(const dsi_st_writer *w, int i) { return w->e[i].name; }

/* The order tensors are laid out in the data section: those whose size is a
 * multiple of 64 bytes first (the weight matrices), so that with the data
 * section starting on a 64-byte boundary every one of them does; the format
 * allows no holes between tensors, so padding inside the data is not an
 * option. Returns a malloc'd permutation of [0, n). */
static int *writer_order(const dsi_st_writer *w) {
    int *ord = malloc(sizeof(int) * (w->n ? w->n : 1)), k = 0;
    if (!ord) return NULL;
    for (int pass = 0; pass < 2; pass++)
        for (int i = 0; i < w->n; i++)
            if ((w->e[i].size % 64 == 0) == (pass == 0)) ord[k++] = i;
    return ord;
}

static char *writer_header(const dsi_st_writer *w, const int *ord, size_t *hlen_out) {
    cJSON *root = cJSON_CreateObject();
    size_t off = 0;
    for (int oi = 0; oi < w->n; oi++) {
        const w_entry *e = &w->e[ord[oi]];
        cJSON *t = cJSON_AddObjectToObject(root, e->name);
        cJSON_AddStringToObject(t, "dtype", dsi_dtype_name(e->dtype));
        cJSON *s = cJSON_AddArrayToObject(t, "shape");
        for (int d = 0; d < e->n_dims; d++) cJSON_AddItemToArray(s, cJSON_CreateNumber((double)e->shape[d]));
        cJSON *o = cJSON_AddArrayToObject(t, "data_offsets");
        cJSON_AddItemToArray(o, cJSON_CreateNumber((double)off));
        cJSON_AddItemToArray(o, cJSON_CreateNumber((double)(off + e->size)));
        off += e->size;
    }
    char *txt = cJSON_PrintUnformatted(root);
    cJSON_Delete(root);
    if (!txt) return NULL;
    /* pad with spaces so that the data section (after the 8-byte length)
     * starts on a 64-byte boundary: mapped weights then load whole cache lines */
    size_t l = strlen(txt), padded = ((8 + l + 63) & ~(size_t)63) - 8;
    char *h = malloc(padded + 1);
    if (h) {
        memcpy(h, txt, l);
        memset(h + l, ' ', padded - l);
        h[padded] = 0;
        *hlen_out = padded;
    }
    free(txt);
    return h;
}

int dsi_st_writer_serialize(const dsi_st_writer *w, void **out_buf, size_t *out_len) {
    size_t hlen;
    int *ord = writer_order(w);
    char *h = ord ? writer_header(w, ord, &hlen) : NULL;
    if (!h) { free(ord); return dsi_error(DSI_ENOMEM, "out of memory"); }
    size_t total = 8 + hlen + w->bytes;
    uint8_t *buf = malloc(total);
    if (!buf) { free(h); free(ord); return dsi_error(DSI_ENOMEM, "out of memory (%zu bytes)", total); }
    for (int i = 0; i < 8; i++) buf[i] = (uint8_t)((uint64_t)hlen >> (8 * i));
    memcpy(buf + 8, h, hlen);
    size_t off = 8 + hlen;
    for (int i = 0; i < w->n; i++) { memcpy(buf + off, w->e[ord[i]].data, w->e[ord[i]].size); off += w->e[ord[i]].size; }
    free(h);
    free(ord);
    *out_buf = buf;
    *out_len = total;
    return DSI_OK;
}

int dsi_st_writer_save(const dsi_st_writer *w, const char *path) {
    size_t hlen;
    int *ord = writer_order(w);
    char *h = ord ? writer_header(w, ord, &hlen) : NULL;
    if (!h) { free(ord); return dsi_error(DSI_ENOMEM, "out of memory"); }
    char tmp[4096];
    snprintf(tmp, sizeof tmp, "%s.tmp.%d", path, (int)getpid());
    FILE *f = fopen(tmp, "wb");
    if (!f) { free(h); free(ord); return dsi_error(DSI_EIO, "%s: %s", tmp, strerror(errno)); }
    uint8_t len8[8];
    for (int i = 0; i < 8; i++) len8[i] = (uint8_t)((uint64_t)hlen >> (8 * i));
    int ok = fwrite(len8, 1, 8, f) == 8 && fwrite(h, 1, hlen, f) == hlen;
    for (int i = 0; ok && i < w->n; i++) ok = fwrite(w->e[ord[i]].data, 1, w->e[ord[i]].size, f) == w->e[ord[i]].size;
    free(h);
    free(ord);
    if (fclose(f) != 0) ok = 0;
    if (!ok || rename(tmp, path) != 0) {
        int e = errno;
        unlink(tmp);
        return dsi_error(DSI_EIO, "%s: write failed: %s", path, strerror(e));
    }
    return DSI_OK;
}

/* ------------------------------------------------------- resident copies */

static int by_data(const void *a, const void *b) {
    const dsi_tensor *x = *(const dsi_tensor *const *)a, *y = *(const dsi_tensor *const *)b;
    return (const uint8_t *)x->data < (const uint8_t *)y->data ? -1 : (const uint8_t *)x->data > (const uint8_t *)y->data;
}

int dsi_st_make_resident(dsi_st_set *set, int huge_pages) {
    dsi_tensor **mine = malloc(sizeof(*mine) * (set->n_tensors ? set->n_tensors : 1));
    if (!mine) return dsi_error(DSI_ENOMEM, "out of memory");
    for (int f = 0; f < set->n_files; f++) {
        st_file *sf = &set->files[f];
        if (!sf->mapped || sf->len == 0) continue;
        /* Each tensor goes to a 64-byte boundary: a checkpoint's tensors sit
         * wherever its header length puts them (8 mod 64 in ours), and a
         * weight row that straddles cache lines makes every 64-byte load a
         * split load: the decode GEMV fell from 35 to 26 GB/s. */
        int n = 0;
        for (int i = 0; i < set->n_tensors; i++)
            if (set->tensors[i].file == sf->path) mine[n++] = &set->tensors[i];
        qsort(mine, n, sizeof(*mine), by_data);
        size_t head = n ? (size_t)((const uint8_t *)mine[0]->data - sf->base) : sf->len;
        size_t need = (head + 63) & ~(size_t)63;
        for (int i = 0; i < n; i++) need = ((need + mine[i]->size_bytes + 63) & ~(size_t)63);
        /* 2 MiB-aligned, so that transparent huge pages can back all of it
         * (an unaligned mapping got none here) */
        size_t huge = (size_t)2 << 20, span = need + huge;
        uint8_t *raw = mmap(NULL, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (raw == MAP_FAILED) {
            free(mine);
            return dsi_error(DSI_ENOMEM, "%s: cannot allocate %zu bytes for a resident copy", sf->path, need);
        }
        uint8_t *mem = (uint8_t *)(((uintptr_t)raw + huge - 1) & ~(uintptr_t)(huge - 1));
        if (mem > raw) munmap(raw, (size_t)(mem - raw));                     /* trim the head */
        size_t len_pg = (need + 4095) & ~(size_t)4095;
        size_t tail = (size_t)(raw + span - (mem + len_pg));
        if (tail) munmap(mem + len_pg, tail);                                  /* and the tail */
        if (huge_pages) madvise(mem, need, MADV_HUGEPAGE);
        memcpy(mem, sf->base, head); /* the header, as read */
        size_t at = (head + 63) & ~(size_t)63;
        for (int i = 0; i < n; i++) {
            memcpy(mem + at, mine[i]->data, mine[i]->size_bytes);
            mine[i]->data = mem + at;
            at = (at + mine[i]->size_bytes + 63) & ~(size_t)63;
        }
        mprotect(mem, need, PROT_READ);
        /* the page-cache copy is no longer needed: let the kernel drop it */
        int fd = open(sf->path, O_RDONLY | O_CLOEXEC);
        if (fd >= 0) {
            posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
            close(fd);
        }
        munmap((void *)sf->base, sf->len);
        sf->base = mem;
        sf->len = need;
    }
    free(mine);
    return DSI_OK;
}
