#!/usr/bin/env bash
# Live economics in `dsinfer serve` (issues 9 and 11): with --pricing, a
# request is billed at the price frozen at its admission (usage.price and
# usage.cost_usd when asked with "include_price"), cache hits at the hit
# price; /metrics carries revenue and GPU cost; GET /v1/pricing shows the
# current prices; the journal feeds `dsinfer report`. Bad pricing files fail
# the start with a clear message. Usage: bash e2e_billing.sh path/to/dsinfer [tests/data]
set -u
BIN=${1:?usage: e2e_billing.sh path/to/dsinfer [tests/data]}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d)
SRV_PID=
cleanup() { [ -n "$SRV_PID" ] && kill -9 "$SRV_PID" 2>/dev/null; rm -rf "$WORK"; }
trap cleanup EXIT
FAILS=0
fail() { echo "FAIL: $*"; FAILS=$((FAILS + 1)); }
pass() { echo "ok: $*"; }
num() { grep -o "\"$2\":[-0-9.e]*" "$1" | head -1 | cut -d: -f2; }

"$BIN" serve --port 0 --threads 1 --pricing "$ROOT/docs/pricing.deepseek.json" --pricing-model deepseek-reasoner \
    --account-journal "$WORK/journal" --account-gpus 8 2>"$WORK/server.log" &
SRV_PID=$!
for _ in $(seq 1 100); do
    PORT=$(sed -n 's/.*on http:\/\/127\.0\.0\.1:\([0-9]*\).*/\1/p' "$WORK/server.log")
    [ -n "$PORT" ] && break
    sleep 0.1
done
[ -n "$PORT" ] || { cat "$WORK/server.log"; echo "FAIL: server did not start"; exit 1; }
URL="http://127.0.0.1:$PORT"

curl -s "$URL/v1/pricing" >"$WORK/pricing"
grep -q '"model":"deepseek-r1"' "$WORK/pricing" && grep -q '"next_change"' "$WORK/pricing" &&
    pass "GET /v1/pricing lists models and the next change" || fail "pricing: $(head -c 300 "$WORK/pricing")"

# 130 prompt tokens: two full blocks can be cached, so the repeat hits 128
ids=$(seq -s, 3 132)
curl -s "$URL/v1/completions" -d "{\"prompt\":[$ids],\"max_tokens\":4,\"ignore_eos\":true,\"include_price\":true}" >"$WORK/a"
curl -s "$URL/v1/completions" -d "{\"prompt\":[$ids],\"max_tokens\":4,\"ignore_eos\":true,\"include_price\":true}" >"$WORK/b"
grep -q '"price":{"model":"deepseek-r1"' "$WORK/a" && pass "usage carries the admission price" || fail "no price: $(cat "$WORK/a")"
# cost = multiplier x (hit x 0.14 + miss x 0.55 + out x 2.19) / 1e6 (the night window may be in force)
check_cost() {
    local f=$1 mult hit miss out cost want
    mult=$(num "$f" multiplier); hit=$(num "$f" prompt_cache_hit_tokens); miss=$(num "$f" prompt_cache_miss_tokens)
    out=$(num "$f" completion_tokens); cost=$(num "$f" cost_usd)
    want=$(awk -v m="$mult" -v h="$hit" -v s="$miss" -v o="$out" 'BEGIN { printf "%.9g", m * (h * 0.14 + s * 0.55 + o * 2.19) / 1e6 }')
    awk -v a="$cost" -v b="$want" 'BEGIN { exit !(a > 0 && (a - b) < 1e-12 && (b - a) < 1e-12) }' &&
        pass "$2: cost_usd $cost = $want (hit $hit, miss $miss, out $out, x$mult)" || fail "$2: cost_usd $cost, want $want"
}
check_cost "$WORK/a" "first request"
check_cost "$WORK/b" "repeat (cache hits at the hit price)"
[ "$(num "$WORK/b" prompt_cache_hit_tokens)" -ge 64 ] && pass "repeat hit the cache" || fail "no cache hit: $(cat "$WORK/b")"

curl -s "$URL/metrics" >"$WORK/metrics"
grep -q '^dsinfer_revenue_usd_total{model="deepseek-r1",class="output"}' "$WORK/metrics" &&
    grep -q '^dsinfer_gpus 8' "$WORK/metrics" && pass "/metrics: revenue and GPUs" ||
    fail "metrics: $(grep -i 'revenue\|gpus' "$WORK/metrics" | head -5)"

kill -TERM "$SRV_PID"; wait "$SRV_PID" 2>/dev/null; SRV_PID=
"$BIN" report --journal "$WORK/journal" >"$WORK/report" 2>&1
grep -q '^requests *2' "$WORK/report" && grep -q 'GPU time' "$WORK/report" && pass "dsinfer report reads the journal" ||
    fail "report: $(cat "$WORK/report")"

# a bad pricing file stops the start with a message naming it
echo '{"version": 1, "models": {"m": {"output": -1}}}' >"$WORK/bad.json"
if "$BIN" serve --port 0 --pricing "$WORK/bad.json" >/dev/null 2>"$WORK/bad.log"; then
    fail "bad pricing file accepted"
else
    grep -q "bad.json" "$WORK/bad.log" && pass "bad pricing file: clear error" || fail "bad pricing: $(cat "$WORK/bad.log")"
fi

# a FIFO journal with no reader is refused at once (it used to block the start forever)
mkfifo "$WORK/fifo"
timeout 20 "$BIN" serve --port 0 --pricing "$ROOT/docs/pricing.example.json" --account-journal "$WORK/fifo" \
    >/dev/null 2>"$WORK/fifo.log"; rc=$?
[ $rc = 1 ] && grep -q "fifo: cannot use as a journal: not a regular file" "$WORK/fifo.log" &&
    pass "FIFO journal refused" || fail "FIFO journal: exit $rc: $(tail -1 "$WORK/fifo.log")"

# many models (30 x 60-character names): the economics still reach /metrics
{ printf '{"models":{'; for i in $(seq 10 39); do
    printf '%s"m%s-%058d":{"input_cache_hit":1,"input_cache_miss":2,"output":3}' "$([ $i = 10 ] || echo ,)" $i 0
  done; printf '}}'; } >"$WORK/many.json"
"$BIN" serve --port 0 --threads 1 --pricing "$WORK/many.json" 2>"$WORK/many.log" &
SRV_PID=$!
PORT=
for _ in $(seq 1 100); do
    PORT=$(sed -n 's/.*on http:\/\/127\.0\.0\.1:\([0-9]*\).*/\1/p' "$WORK/many.log")
    [ -n "$PORT" ] && break
    sleep 0.1
done
n=$(curl -s "http://127.0.0.1:$PORT/metrics" | grep -c '^dsinfer_revenue_usd_total{')
[ "$n" = 90 ] && pass "/metrics: revenue for all 30 models" || fail "/metrics with 30 models: $n revenue lines, want 90"
kill -9 "$SRV_PID"; wait "$SRV_PID" 2>/dev/null; SRV_PID=

echo "e2e_billing: $FAILS failure(s)"
[ "$FAILS" = 0 ]
