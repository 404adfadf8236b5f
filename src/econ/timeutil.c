/* Time zones as fixed UTC offsets, ISO-8601 parsing and formatting.
 *
 * Pricing windows are written in the operator's local time; we accept only
 * fixed offsets ("UTC+8") because a named zone's offset moves with daylight
 * saving and would silently shift a discount window by an hour twice a year. */
#include "dsinfer/econ.h"

#include <ctype.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static int parse_2digits(const char *s, int *v) {
    if (!isdigit((unsigned char)s[0]) || !isdigit((unsigned char)s[1])) return 0;
    *v = (s[0] - '0') * 10 + (s[1] - '0');
    return 1;
}

/* "+8", "+08", "+08:00", "+0800", "-05:30" (sign already consumed by caller is
 * not allowed: s points at the sign). Returns 1 on success. */
static int parse_offset(const char *s, int *off_min) {
    int sign = 1;
    if (*s == '+') sign = 1;
    else if (*s == '-') sign = -1;
    else return 0;
    s++;
    int h = 0, m = 0, nd = 0;
    while (isdigit((unsigned char)s[nd]) && nd < 4) nd++;
    if (nd == 1 || nd == 2) {
        h = atoi(s);
        s += nd;
        if (*s == ':') {
            if (!parse_2digits(s + 1, &m)) return 0;
            s += 3;
        }
    } else if (nd == 4) {
        parse_2digits(s, &h);
        parse_2digits(s + 2, &m);
        s += 4;
    } else {
        return 0;
    }
    if (*s != '\0' || h > 14 || m > 59) return 0;
    *off_min = sign * (h * 60 + m);
    return 1;
}

int dsi_econ_parse_tz(const char *s, int *offset_min) {
    if (!s || !offset_min) return dsi_error(DSI_EINVAL, "time zone: NULL argument");
    if (!strcmp(s, "UTC") || !strcmp(s, "Z") || !strcmp(s, "GMT")) {
        *offset_min = 0;
        return DSI_OK;
    }
    const char *p = NULL;
    if (!strncmp(s, "UTC", 3)) p = s + 3;
    else if (!strncmp(s, "GMT", 3)) p = s + 3;
    else if (s[0] == '+' || s[0] == '-') p = s;
    if (p && parse_offset(p, offset_min)) return DSI_OK;
    return dsi_error(DSI_EINVAL,
                     "bad time zone '%s': use a fixed offset such as \"UTC\", \"UTC+8\" or "
                     "\"UTC-05:30\" (named zones move with daylight saving)",
                     s);
}

int dsi_econ_parse_time(const char *s, double *unix_s) {
    if (!s || !unix_s) return dsi_error(DSI_EINVAL, "time: NULL argument");
    char *end = NULL;
    /* Plain Unix seconds. */
    double v = strtod(s, &end);
    if (end != s && *end == '\0' && strlen(s) < 9 + 12 && !strchr(s, '-')) {
        if (!isfinite(v)) return dsi_error(DSI_EINVAL, "bad time '%s'", s);
        *unix_s = v;
        return DSI_OK;
    }
    int Y, M, D, h = 0, m = 0, sec = 0;
    int n = 0;
    if (sscanf(s, "%4d-%2d-%2d%n", &Y, &M, &D, &n) != 3 || n != 10) goto bad;
    const char *p = s + n;
    double frac = 0;
    if (*p == 'T' || *p == ' ') {
        p++;
        if (!parse_2digits(p, &h) || p[2] != ':' || !parse_2digits(p + 3, &m)) goto bad;
        p += 5;
        if (*p == ':') {
            if (!parse_2digits(p + 1, &sec)) goto bad;
            p += 3;
            if (*p == '.') {
                char *e2;
                frac = strtod(p, &e2);
                p = e2;
            }
        }
    }
    int off = 0;
    if (*p == 'Z') {
        if (p[1] != '\0') goto bad;
    } else if (*p == '+' || *p == '-') {
        if (!parse_offset(p, &off)) goto bad;
    } else if (*p != '\0') {
        goto bad;
    }
    if (M < 1 || M > 12 || D < 1 || D > 31 || h > 24 || m > 59 || sec > 60) goto bad;
    struct tm tm = {0};
    tm.tm_year = Y - 1900;
    tm.tm_mon = M - 1;
    tm.tm_mday = D;
    tm.tm_hour = h;
    tm.tm_min = m;
    tm.tm_sec = sec;
    time_t t = timegm(&tm);
    *unix_s = (double)t + frac - off * 60.0;
    return DSI_OK;
bad:
    return dsi_error(DSI_EINVAL,
                     "bad time '%s': use Unix seconds or ISO 8601 such as 2025-02-27T12:00:00+08:00", s);
}

void dsi_econ_format_time(double unix_s, char *buf, size_t cap) {
    if (!buf || cap == 0) return;
    if (!isfinite(unix_s)) {
        snprintf(buf, cap, "%s", unix_s > 0 ? "never" : "always");
        return;
    }
    if (fabs(unix_s) > 1e15) { /* beyond any calendar gmtime_r handles */
        snprintf(buf, cap, "%.6g", unix_s);
        return;
    }
    time_t t = (time_t)floor(unix_s);
    struct tm tm;
    if (!gmtime_r(&t, &tm)) {
        snprintf(buf, cap, "%.0f", unix_s);
        return;
    }
    strftime(buf, cap, "%Y-%m-%dT%H:%M:%SZ", &tm);
}
