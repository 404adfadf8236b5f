/* dsinfer report: cost, revenue and cost-profit margin for a period, summed
 * from the account journal the server and router append to. */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "cli/cli.h"
#include "dsinfer/econ.h"

static void usage(FILE *f) {
    fprintf(f, "usage: dsinfer report --journal FILE [--from TIME] [--to TIME] [--json]\n\n"
               "Sums an account journal (JSON lines written by the server's account) over [from, to):\n"
               "tokens by class, revenue at admission-time prices, GPU hours and cost following scale\n"
               "events, and the cost-profit margin (revenue - cost) / cost.\n"
               "TIME is Unix seconds or ISO 8601 (2025-02-27T12:00:00+08:00); default: the whole journal.\n");
}

int dsi_cmd_report(int argc, char **argv) {
    const char *journal = NULL;
    double from = -INFINITY, to = INFINITY;
    int json = 0;
    for (int i = 1; i < argc; i++) {
        int missing = 0;
        const char *v;
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            usage(stdout);
            return 0;
        } else if (!strcmp(argv[i], "--json")) {
            json = 1;
        } else if ((v = dsi_cli_flag(argc, argv, &i, "--journal", &missing))) {
            journal = v;
        } else if ((v = dsi_cli_flag(argc, argv, &i, "--from", &missing))) {
            if (dsi_econ_parse_time(v, &from)) {
                fprintf(stderr, "dsinfer report: --from: %s\n", dsi_last_error());
                return 2;
            }
        } else if ((v = dsi_cli_flag(argc, argv, &i, "--to", &missing))) {
            if (dsi_econ_parse_time(v, &to)) {
                fprintf(stderr, "dsinfer report: --to: %s\n", dsi_last_error());
                return 2;
            }
        } else {
            if (missing) fprintf(stderr, "dsinfer report: %s needs a value\n", argv[i]);
            else fprintf(stderr, "dsinfer report: unknown option '%s'\n", argv[i]);
            usage(stderr);
            return 2;
        }
        if (missing) {
            fprintf(stderr, "dsinfer report: %s needs a value\n", argv[i]);
            return 2;
        }
    }
    if (!journal) {
        fprintf(stderr, "dsinfer report: --journal FILE is required\n");
        usage(stderr);
        return 2;
    }
    dsi_econ_report r;
    if (dsi_econ_report_journal(journal, from, to, &r)) {
        fprintf(stderr, "dsinfer report: %s\n", dsi_last_error());
        return 1;
    }
    char a[40], b[40];
    dsi_econ_format_time(r.from, a, sizeof a);
    dsi_econ_format_time(r.to, b, sizeof b);
    if (json) {
        printf("{\"from\":\"%s\",\"to\":\"%s\",\"hours\":%.4f,\"requests\":%llu,\"tokens\":{", a, b,
               (r.to - r.from) / 3600, (unsigned long long)r.requests);
        for (int c = 0; c < DSI_TOK_N; c++)
            printf("%s\"%s\":%llu", c ? "," : "", dsi_token_class_name(c), (unsigned long long)r.tokens[c]);
        printf("},\"revenue_usd\":%.6f,\"gpu_hours\":%.6f,\"cost_usd\":%.6f,\"margin\":%.6f,\"bad_lines\":%llu}\n",
               r.revenue_usd, r.gpu_hours, r.cost_usd, r.margin, (unsigned long long)r.bad_lines);
        return 0;
    }
    printf("period     %s .. %s (%.2f h)\n", a, b, (r.to - r.from) / 3600);
    printf("requests   %llu\n", (unsigned long long)r.requests);
    for (int c = 0; c < DSI_TOK_N; c++)
        printf("tokens     %-17s %15llu (paying %llu)\n", dsi_token_class_name(c), (unsigned long long)r.tokens[c],
               (unsigned long long)r.paid_tokens[c]);
    printf("revenue    $%.2f\n", r.revenue_usd);
    printf("GPU time   %.2f GPU-hours\n", r.gpu_hours);
    printf("cost       $%.2f\n", r.cost_usd);
    if (r.cost_usd > 0) printf("margin     %.1f%%  ((revenue - cost) / cost)\n", r.margin * 100);
    else printf("margin     n/a (no GPU cost in the period)\n");
    if (r.bad_lines) fprintf(stderr, "dsinfer report: skipped %llu malformed lines\n", (unsigned long long)r.bad_lines);
    return 0;
}
