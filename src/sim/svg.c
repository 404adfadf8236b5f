/* SVG charts of a simulated day, in the spirit of DeepSeek's published ones:
 * node count over 24 h, and hourly cost against revenue. Plain SVG 1.1 text:
 * any browser or rsvg-convert renders it. */
#include "dsinfer/sim.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define W 900
#define H 420
#define ML 80 /* margins */
#define MR 30
#define MT 50
#define MB 60

/* A round step for about `n` ticks over [0, max]. */
static double nice_step(double max, int n) {
    double raw = max / n, mag = pow(10, floor(log10(raw > 0 ? raw : 1)));
    double f = raw / mag;
    return (f <= 1 ? 1 : f <= 2 ? 2 : f <= 5 ? 5 : 10) * mag;
}

static void header(FILE *f, const char *title) {
    fprintf(f,
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n"
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%d\" height=\"%d\" viewBox=\"0 0 %d %d\" "
            "font-family=\"DejaVu Sans, Arial, sans-serif\" font-size=\"12\">\n"
            "<rect width=\"%d\" height=\"%d\" fill=\"white\"/>\n"
            "<text x=\"%d\" y=\"28\" font-size=\"16\" text-anchor=\"middle\">",
            W, H, W, H, W, H, W / 2);
    for (const char *c = title; *c; c++) {
        if (*c == '<') fputs("&lt;", f);
        else if (*c == '&') fputs("&amp;", f);
        else fputc(*c, f);
    }
    fputs("</text>\n", f);
}

/* Axes with y ticks up to ymax and x ticks every 2 hours of local time. */
static void axes(FILE *f, const dsi_sim_config *c, double ymax, const char *ylabel, int money) {
    double step = nice_step(ymax, 6);
    for (double y = 0; y <= ymax + 1e-9; y += step) {
        double py = MT + (H - MT - MB) * (1 - y / ymax);
        fprintf(f, "<line x1=\"%d\" y1=\"%.1f\" x2=\"%d\" y2=\"%.1f\" stroke=\"#e0e0e0\"/>\n", ML, py, W - MR, py);
        if (money) fprintf(f, "<text x=\"%d\" y=\"%.1f\" text-anchor=\"end\">$%.0fk</text>\n", ML - 6, py + 4, y / 1e3);
        else fprintf(f, "<text x=\"%d\" y=\"%.1f\" text-anchor=\"end\">%.0f</text>\n", ML - 6, py + 4, y);
    }
    int start_h = (int)floor(fmod((c->day_start + c->tz_offset_min * 60.0) / 3600.0, 24.0) + 0.5);
    for (int h = 0; h <= 24; h += 2) {
        double px = ML + (W - ML - MR) * h / 24.0;
        fprintf(f, "<line x1=\"%.1f\" y1=\"%d\" x2=\"%.1f\" y2=\"%d\" stroke=\"#999\"/>\n", px, H - MB, px, H - MB + 5);
        fprintf(f, "<text x=\"%.1f\" y=\"%d\" text-anchor=\"middle\">%02d:00</text>\n", px, H - MB + 18,
                (start_h + h) % 24);
    }
    fprintf(f, "<line x1=\"%d\" y1=\"%d\" x2=\"%d\" y2=\"%d\" stroke=\"black\"/>\n", ML, H - MB, W - MR, H - MB);
    fprintf(f, "<line x1=\"%d\" y1=\"%d\" x2=\"%d\" y2=\"%d\" stroke=\"black\"/>\n", ML, MT, ML, H - MB);
    int tz_h = c->tz_offset_min / 60, tz_m = abs(c->tz_offset_min % 60);
    fprintf(f, "<text x=\"%d\" y=\"%d\" text-anchor=\"middle\">time of day (UTC%+d%s%.0d)</text>\n", (ML + W - MR) / 2,
            H - 18, tz_h, tz_m ? ":" : "", tz_m);
    fprintf(f, "<text transform=\"translate(20 %d) rotate(-90)\" text-anchor=\"middle\">%s</text>\n", (MT + H - MB) / 2,
            ylabel);
}

int dsi_sim_svg_nodes(const dsi_sim_result *r, const dsi_sim_config *c, const char *path, const char *title) {
    if (!r || !c || !path) return dsi_error(DSI_EINVAL, "svg: NULL argument");
    FILE *f = fopen(path, "w");
    if (!f) return dsi_error(DSI_EIO, "%s: cannot write: %s", path, strerror(errno));
    char t[160];
    snprintf(t, sizeof t, "%s", title ? title : "Inference nodes over the day");
    header(f, t);
    double top = fmax(r->peak_nodes, DSI_SIM_TARGET_PEAK_NODES) * 1.15, st = nice_step(top, 6);
    double ymax = st * ceil(top / st);
    axes(f, c, ymax, "nodes (8 GPUs each)", 0);
    double plot_w = W - ML - MR, plot_h = H - MT - MB;
    /* filled step area */
    fprintf(f, "<path fill=\"#4f8cc9\" fill-opacity=\"0.35\" stroke=\"#1f5f9f\" stroke-width=\"1.5\" d=\"M%d %d", ML,
            H - MB);
    for (int m = 0; m < DSI_SIM_MINUTES; m++) {
        double x0 = ML + plot_w * m / DSI_SIM_MINUTES, x1 = ML + plot_w * (m + 1) / DSI_SIM_MINUTES;
        double y = MT + plot_h * (1 - r->nodes[m] / ymax);
        fprintf(f, " L%.1f %.1f L%.1f %.1f", x0, y, x1, y);
    }
    fprintf(f, " L%d %d Z\"/>\n", W - MR, H - MB);
    double ya = MT + plot_h * (1 - r->avg_nodes / ymax);
    fprintf(f, "<line x1=\"%d\" y1=\"%.1f\" x2=\"%d\" y2=\"%.1f\" stroke=\"#d62728\" stroke-dasharray=\"6 4\"/>\n", ML,
            ya, W - MR, ya);
    fprintf(f, "<text x=\"%d\" y=\"%.1f\" text-anchor=\"end\" fill=\"#d62728\">average %.2f</text>\n", W - MR - 4,
            ya - 6, r->avg_nodes);
    double yp = MT + plot_h * (1 - r->peak_nodes / ymax);
    fprintf(f, "<text x=\"%d\" y=\"%.1f\" fill=\"#1f5f9f\">peak %.0f</text>\n", ML + 8, yp - 6, r->peak_nodes);
    fprintf(f, "<text x=\"%d\" y=\"%d\" fill=\"#555\">published: peak %d, average %.2f</text>\n", ML + 8, MT + 14,
            DSI_SIM_TARGET_PEAK_NODES, DSI_SIM_TARGET_AVG_NODES);
    fputs("</svg>\n", f);
    int bad = ferror(f);
    if (fclose(f) || bad) return dsi_error(DSI_EIO, "%s: write failed", path);
    return DSI_OK;
}

int dsi_sim_svg_money(const dsi_sim_result *r, const dsi_sim_config *c, const char *path, const char *title) {
    if (!r || !c || !path) return dsi_error(DSI_EINVAL, "svg: NULL argument");
    FILE *f = fopen(path, "w");
    if (!f) return dsi_error(DSI_EIO, "%s: cannot write: %s", path, strerror(errno));
    header(f, title ? title : "Hourly cost and revenue");
    double mx = 0;
    for (int h = 0; h < 24; h++) mx = fmax(mx, fmax(r->hourly_cost[h], r->hourly_revenue[h]));
    double step = nice_step(mx * 1.1 > 0 ? mx * 1.1 : 1, 6);
    double ymax = step * ceil(mx * 1.1 / step);
    if (ymax <= 0) ymax = 1;
    axes(f, c, ymax, "USD per hour", 1);
    double plot_w = W - ML - MR, plot_h = H - MT - MB, slot = plot_w / 24, bw = slot * 0.38;
    for (int h = 0; h < 24; h++) {
        double x = ML + slot * h + slot * 0.1;
        double hc = plot_h * r->hourly_cost[h] / ymax, hr = plot_h * r->hourly_revenue[h] / ymax;
        fprintf(f, "<rect x=\"%.1f\" y=\"%.1f\" width=\"%.1f\" height=\"%.1f\" fill=\"#d62728\"/>\n", x, H - MB - hc, bw,
                hc);
        fprintf(f, "<rect x=\"%.1f\" y=\"%.1f\" width=\"%.1f\" height=\"%.1f\" fill=\"#2ca02c\"/>\n", x + bw, H - MB - hr,
                bw, hr);
    }
    fprintf(f,
            "<rect x=\"%d\" y=\"%d\" width=\"12\" height=\"12\" fill=\"#d62728\"/><text x=\"%d\" y=\"%d\">cost "
            "$%.0f/day</text>\n",
            ML + 10, MT + 4, ML + 28, MT + 14, r->cost_usd);
    fprintf(f,
            "<rect x=\"%d\" y=\"%d\" width=\"12\" height=\"12\" fill=\"#2ca02c\"/><text x=\"%d\" y=\"%d\">revenue "
            "$%.0f/day (margin %.0f%%)</text>\n",
            ML + 200, MT + 4, ML + 218, MT + 14, r->revenue_usd, r->margin * 100);
    fputs("</svg>\n", f);
    int bad = ferror(f);
    if (fclose(f) || bad) return dsi_error(DSI_EIO, "%s: write failed", path);
    return DSI_OK;
}
