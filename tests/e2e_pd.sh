#!/usr/bin/env bash
# End-to-end test of prefill/decode disaggregation on 127.0.0.1 with the
# built-in demo model: a router in front of 2 prefill + 2 decode instances
# answers exactly as one `--role both` server (greedy and seeded sampling,
# streaming and not, chat, prefix-cache hits); bad requests get the same
# errors; a prefill instance that fails is retried on another; admin drain
# and leave; the autoscaler adds a standby instance and the GPU count on
# /metrics follows; a decode instance killed under load: requests on the
# other complete, the killed ones end with an error event and [DONE]; with
# --api-key on router and instances, keyless calls get 401 and keyed ones the
# same answers; a client that leaves, a router stopped mid-request, and a
# decode instance that hangs (SIGSTOP) end their requests.
# Usage: bash e2e_pd.sh path/to/dsinfer [data-dir]
set -u
BIN=${1:?usage: e2e_pd.sh path/to/dsinfer [tests/data]}
DATA=${2:-$(dirname "$0")/data}
WORK=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null; done; rm -rf "$WORK"; }
trap cleanup EXIT
FAILS=0
fail() { echo "FAIL: $*"; FAILS=$((FAILS + 1)); }
pass() { echo "ok: $*"; }

wait_port() { # log-file pattern -> port
    local p i
    for i in $(seq 1 100); do
        p=$(sed -n "s/.*$2 on http:\/\/127\.0\.0\.1:\([0-9]*\).*/\1/p" "$1" 2>/dev/null | head -1)
        [ -n "$p" ] && { echo "$p"; return; }
        sleep 0.1
    done
    cat "$1" >&2
}
LAST_PID=
serve() { # name role extra... -> port; pid in LAST_PID (call without a subshell)
    local name=$1 role=$2; shift 2
    "$BIN" serve --port 0 --threads 1 --role "$role" "$@" 2>"$WORK/$name.log" &
    LAST_PID=$!
    PIDS+=("$LAST_PID")
}
serve both both;     PID_BOTH=$LAST_PID
serve p1 prefill;    PID_P1=$LAST_PID
serve p2 prefill;    PID_P2=$LAST_PID
serve d1 decode;     PID_D1=$LAST_PID
serve d2 decode;     PID_D2=$LAST_PID
serve d3 decode;     PID_D3=$LAST_PID    # standby, for the autoscaler router
for n in both p1 p2 d1 d2 d3; do
    port=$(wait_port "$WORK/$n.log" "model dsinfer-demo")
    [ -n "$port" ] || { echo "FAIL: $n did not start"; exit 1; }
    eval "PORT_$n=$port"
done
U() { eval "echo http://127.0.0.1:\$PORT_$1"; }
"$BIN" router --port 0 --prefill "$(U p1),$(U p2)" --decode "$(U d1),$(U d2)" 2>"$WORK/router.log" &
PID_R=$!; PIDS+=("$PID_R")
RPORT=$(wait_port "$WORK/router.log" "instances (deepseek LB)")
[ -n "$RPORT" ] || { echo "FAIL: router did not start"; exit 1; }
R="http://127.0.0.1:$RPORT"
B=$(U both)
echo "router on $R, single server on $B"

[ "$(curl -s -o /dev/null -w '%{http_code}' "$R/health")" = 200 ] && pass "router health" || fail "router health"
curl -s "$R/v1/models" | grep -q '"id":"dsinfer-demo"' && pass "models through the router" || fail "models"

# ---------------------------------------------------------------- outputs equal a single server
ids_of() { local n=$1 s=$2 out="" i; for i in $(seq 0 $((n - 1))); do out="$out$(( (s * 131 + i * 37 + 11) % 2000 )),"; done; echo "${out%,}"; }
body_ids() { grep -o '"token_ids":\[[0-9,]*\]' "$1" | head -1 | sed 's/.*\[\(.*\)\]/\1/' | tr ',' ' '; }
sse_ids() { grep -o '"token_ids":\[[0-9]*\]' "$1" | sed 's/.*\[\(.*\)\]/\1/' | tr '\n' ' ' | sed 's/ $//'; }
usage_of() { grep -o '"usage":{[^}]*}' "$1" | head -1; }
declare -a REQ
REQ[0]="{\"prompt\":[$(ids_of 5 1)],\"max_tokens\":12,\"temperature\":0,\"ignore_eos\":true,\"return_token_ids\":true}"
REQ[1]="{\"prompt\":[$(ids_of 150 2)],\"max_tokens\":20,\"temperature\":0,\"ignore_eos\":true,\"return_token_ids\":true,\"stream\":true,\"stream_options\":{\"include_usage\":true}}"
REQ[2]="{\"prompt\":[$(ids_of 70 3)],\"max_tokens\":16,\"temperature\":0.8,\"top_p\":0.9,\"seed\":7,\"ignore_eos\":true,\"return_token_ids\":true}"
REQ[3]="{\"prompt\":[$(ids_of 300 4)],\"max_tokens\":24,\"temperature\":1.0,\"seed\":42,\"ignore_eos\":true,\"return_token_ids\":true,\"stream\":true}"
REQ[4]="{\"prompt\":[$(ids_of 64 5)],\"max_tokens\":8,\"temperature\":0,\"ignore_eos\":true,\"return_token_ids\":true,\"logprobs\":2}"
for k in 0 1 2 3 4; do
    curl -s -N "$R/v1/completions" -d "${REQ[$k]}" >"$WORK/r$k" &
    curl -s -N "$B/v1/completions" -d "${REQ[$k]}" >"$WORK/b$k" &
done
wait_jobs() { for j in $(jobs -p); do case " ${PIDS[*]} " in *" $j "*) ;; *) wait "$j" ;; esac; done; }
wait_jobs
for k in 0 1 2 3 4; do
    if grep -q '"stream":true' <<<"${REQ[$k]}"; then got=$(sse_ids "$WORK/r$k"); want=$(sse_ids "$WORK/b$k")
    else got=$(body_ids "$WORK/r$k"); want=$(body_ids "$WORK/b$k"); fi
    [ -n "$want" ] && [ "$got" = "$want" ] && pass "request $k: router = single server ($(echo "$got" | wc -w) tokens)" \
        || fail "request $k: router '$got' vs single '$want' ($(head -c 300 "$WORK/r$k"))"
done
[ "$(usage_of "$WORK/r1")" = "$(usage_of "$WORK/b1")" ] && pass "streamed usage equal" || fail "usage: $(usage_of "$WORK/r1") vs $(usage_of "$WORK/b1")"
# (values to 2 decimals: a batch's composition may move the last digits, as on one server)
strip() { sed -E 's/"id":"[^"]*","object":"[^"]*","created":[0-9]*//; s/([0-9]\.[0-9]{2})[0-9]*/\1/g' "$1"; }
grep -q '"top_logprobs":\[{' "$WORK/r4" && [ "$(strip "$WORK/r4")" = "$(strip "$WORK/b4")" ] \
    && pass "logprobs with top alternatives through the router: body identical" || fail "logprobs: $(head -c 400 "$WORK/r4")"
[ "$(grep -c '^data: ' "$WORK/r1")" -ge 20 ] && tail -2 "$WORK/r1" | grep -q '\[DONE\]' \
    && pass "streaming through the router: $(grep -c '^data: ' "$WORK/r1") events, [DONE]" || fail "stream: $(tail -c 300 "$WORK/r1")"
# chat, seeded
CHAT='{"messages":[{"role":"user","content":"Hello there, how are you?"}],"max_tokens":10,"seed":3,"stream":true}'
curl -s -N "$R/v1/chat/completions" -d "$CHAT" | sed 's/"id":"[^"]*","object":"[^"]*","created":[0-9]*//' >"$WORK/rc"
curl -s -N "$B/v1/chat/completions" -d "$CHAT" | sed 's/"id":"[^"]*","object":"[^"]*","created":[0-9]*//' >"$WORK/bc"
cmp -s "$WORK/rc" "$WORK/bc" && grep -q reasoning_content "$WORK/rc" && pass "chat stream identical to the single server" \
    || fail "chat differs: $(diff "$WORK/rc" "$WORK/bc" | head -5)"

# ---------------------------------------------------------------- prefix cache: a repeated long prompt
LONG="{\"prompt\":[$(ids_of 200 9)],\"max_tokens\":4,\"temperature\":0,\"return_token_ids\":true}"
for round in 1 2; do
    curl -s "$R/v1/completions" -d "$LONG" >"$WORK/lr$round"
    curl -s "$B/v1/completions" -d "$LONG" >"$WORK/lb$round"
done
# a third time: with two decode instances, some instance now sees it twice
curl -s "$R/v1/completions" -d "$LONG" >"$WORK/lr3"
[ "$(usage_of "$WORK/lr2")" = "$(usage_of "$WORK/lb2")" ] && grep -q '"prompt_cache_hit_tokens":192' "$WORK/lr2" \
    && [ "$(body_ids "$WORK/lr2")" = "$(body_ids "$WORK/lb2")" ] && [ "$(body_ids "$WORK/lr3")" = "$(body_ids "$WORK/lb2")" ] \
    && pass "repeated prompt through the router: 192 cached tokens, as the single server" \
    || fail "prefix cache: $(usage_of "$WORK/lr2") vs $(usage_of "$WORK/lb2")"

# blocks the decode instance already holds are not sent again
skipped=$(curl -s "$R/metrics" | awk '$1 == "dsinfer_router_kv_blocks_skipped_total" {print $2}')
[ "${skipped:-0}" -ge 3 ] && pass "repeat: $skipped KV blocks not re-sent (the decode side held them)" \
    || fail "no blocks skipped on a repeated prompt ($skipped)"

# ---------------------------------------------------------------- the shared disk tier
# prefill and two decode instances on one --kv-disk directory: a prompt decoded
# on dA, then (dA drained) on dB: dB finds the blocks on disk, they are not sent
mkdir -p "$WORK/kvdisk"
serve pk prefill --kv-disk "$WORK/kvdisk"; PID_PK=$LAST_PID
serve da decode --kv-disk "$WORK/kvdisk"; PID_DA=$LAST_PID
serve db decode --kv-disk "$WORK/kvdisk"; PID_DB=$LAST_PID
for n in pk da db; do eval "PORT_$n=$(wait_port "$WORK/$n.log" "model dsinfer-demo")"; done
"$BIN" router --port 0 --prefill "$(U pk)" --decode "$(U da),$(U db)" 2>"$WORK/router4.log" &
PID_R4=$!; PIDS+=("$PID_R4")
R4="http://127.0.0.1:$(wait_port "$WORK/router4.log" "instances (deepseek LB)")"
DISKP="{\"prompt\":[$(ids_of 200 17)],\"max_tokens\":4,\"temperature\":0,\"return_token_ids\":true}"
curl -s "$R4/v1/completions" -d "$DISKP" >"$WORK/disk1"
sleep 0.5   # block files are written asynchronously
used=$(curl -s "$R4/admin/instances" | grep -o "\"url\":\"[^\"]*\",\"role\":\"decode\"[^}]*\"routed\":1" | sed 's/"url":"\([^"]*\)".*/\1/')
other=$(U da); [ "$used" = "$(U da)" ] && other=$(U db)
curl -s "$R4/admin/instances" -d "{\"action\":\"drain\",\"role\":\"decode\",\"url\":\"$used\"}" >/dev/null
curl -s "$R4/v1/completions" -d "$DISKP" >"$WORK/disk2"
sk=$(curl -s "$R4/metrics" | awk '$1 == "dsinfer_router_kv_blocks_skipped_total" {print $2}')
[ -n "$used" ] && [ "$(body_ids "$WORK/disk1")" = "$(body_ids "$WORK/disk2")" ] && [ "${sk:-0}" -ge 3 ] \
    && [ "$(curl -s "$other/metrics" | awk '$1 == "dsinfer_kv_disk_hits_total" {print $2}')" -ge 3 ] \
    && pass "disk tier: $sk blocks not sent, the second decode instance loaded them from disk, same output" \
    || fail "disk tier: used='$used' skipped=$sk, $(body_ids "$WORK/disk1") vs $(body_ids "$WORK/disk2")"
kill "$PID_R4" "$PID_PK" "$PID_DA" "$PID_DB" 2>/dev/null

# ---------------------------------------------------------------- bad requests
code=$(curl -s -o "$WORK/e1" -w '%{http_code}' "$R/v1/completions" -d '{"prompt":[1,2],"max_tokens":0}')
[ "$code" = 400 ] && grep -q '"param":"max_tokens"' "$WORK/e1" && pass "bad request -> 400 with the instance's error" || fail "bad request: $code $(cat "$WORK/e1")"
code=$(curl -s -o "$WORK/e2" -w '%{http_code}' "$R/v1/completions" -d '{"prompt": [1,')
[ "$code" = 400 ] && pass "malformed JSON -> 400" || fail "malformed: $code"
[ "$(curl -s -o /dev/null -w '%{http_code}' "$R/v1/nothing")" = 404 ] && pass "unknown endpoint -> 404" || fail "404"

# ---------------------------------------------------------------- admin: drain, leave, join
curl -s "$R/admin/instances" -d "{\"action\":\"drain\",\"role\":\"decode\",\"url\":\"$(U d1)\"}" >/dev/null
before=$(curl -s "$(U d1)/metrics" | awk '$1 == "dsinfer_generation_tokens_total" {print $2}')
for k in 1 2 3; do curl -s "$R/v1/completions" -d "{\"prompt\":[1,2,$k],\"max_tokens\":3}" >/dev/null; done
after=$(curl -s "$(U d1)/metrics" | awk '$1 == "dsinfer_generation_tokens_total" {print $2}')
[ "$before" = "$after" ] && pass "drained decode instance gets no new requests" || fail "drain: $before -> $after"
curl -s "$R/admin/instances" -d "{\"action\":\"undrain\",\"role\":\"decode\",\"url\":\"$(U d1)\"}" >/dev/null
curl -s "$R/admin/instances" -d "{\"action\":\"leave\",\"role\":\"prefill\",\"url\":\"$(U p2)\"}" | grep -q "$(U p2)" \
    && fail "left instance still listed" || pass "admin leave"
curl -s "$R/admin/instances" -d "{\"action\":\"join\",\"role\":\"prefill\",\"url\":\"$(U p2)\"}" | grep -q "$(U p2)" \
    && pass "admin join" || fail "admin join"
code=$(curl -s -o /dev/null -w '%{http_code}' "$R/admin/instances" -d '{"action":"join"}')
[ "$code" = 400 ] && pass "admin: bad body -> 400" || fail "admin bad body: $code"
# one instance under another spelling is the same member; bad URLs get a 400 in valid JSON
n0=$(curl -s "$R/admin/instances" | grep -o '"url"' | wc -l)
curl -s "$R/admin/instances" -d "{\"action\":\"join\",\"role\":\"prefill\",\"url\":\"$(U p2 | sed 's|http://||')/\"}" >/dev/null
n1=$(curl -s "$R/admin/instances" | grep -o '"url"' | wc -l)
body=$(curl -s "$R/admin/instances" -d '{"action":"join","role":"decode","url":"http://a\"b:1"}')
[ "$n0" = "$n1" ] && [ "$(curl -s -o /dev/null -w '%{http_code}' "$R/admin/instances" -d '{"action":"join","role":"decode","url":"ftp://h:1"}')" = 400 ] \
    && grep -q '^{"error":{"message":"bad instance URL (http://host:port expected)","type":"invalid_request_error"' <<<"$body" \
    && pass "admin: one spelling per instance, bad URLs refused" || fail "admin URLs: $n0 -> $n1 members, $body"
# wrong methods: 405, as on the instances
[ "$(curl -s -o /dev/null -w '%{http_code}' -X DELETE "$R/admin/instances")" = 405 ] \
    && [ "$(curl -s -o /dev/null -w '%{http_code}' -X POST "$R/health")" = 405 ] && pass "router: 405 for wrong methods" \
    || fail "router methods"
# a decode instance joined as prefill stays out of the prefill pool (its refusals reached clients as 400s)
curl -s "$R/admin/instances" -d "{\"action\":\"join\",\"role\":\"prefill\",\"url\":\"$(U d2)\"}" >/dev/null
sleep 0.5
ok=1
for k in 1 2 3 4 5 6; do
    [ "$(curl -s -o /dev/null -w '%{http_code}' "$R/v1/completions" -d "{\"prompt\":[3,4,$k],\"max_tokens\":2}")" = 200 ] || ok=0
done
curl -s "$R/admin/instances" | grep -q "\"url\":\"$(U d2)\",\"role\":\"prefill\",\"member\":true,\"state\":\"[a-z]*\",\"draining\":false,\"routable\":false" || ok=0
curl -s "$R/admin/instances" -d "{\"action\":\"leave\",\"role\":\"prefill\",\"url\":\"$(U d2)\"}" >/dev/null
[ "$ok" = 1 ] && pass "decode instance joined as prefill: not routed to" || fail "role mismatch: $(curl -s "$R/admin/instances")"

# ---------------------------------------------------------------- a failing prefill instance is retried elsewhere
# A prefill instance with other weights (same name and tokenizer): the decode
# instances refuse its KV (fingerprint), so its prefills fail and the router retries.
"$BIN" make-model --preset tiny --dtype fp8 --seed 99 --out "$WORK/other" >/dev/null 2>&1 \
    && cp "$DATA"/golden/tokenizer/tokenizer*.json "$WORK/other/" 2>/dev/null
if [ -f "$WORK/other/config.json" ] && [ -f "$WORK/other/tokenizer.json" ]; then
    serve bad prefill --model "$WORK/other" --served-model-name dsinfer-demo; PID_BAD=$LAST_PID
    PORT_bad=$(wait_port "$WORK/bad.log" "model dsinfer-demo")
    # listed first: on an idle pool the balancer's tie goes to it
    "$BIN" router --port 0 --prefill "$(U bad),$(U p1)" --decode "$(U d2)" 2>"$WORK/router2.log" &
    PID_R2=$!; PIDS+=("$PID_R2")
    R2="http://127.0.0.1:$(wait_port "$WORK/router2.log" "instances (deepseek LB)")"
    curl -s "$R2/v1/completions" -d "${REQ[0]}" >"$WORK/retry"
    [ "$(body_ids "$WORK/retry")" = "$(body_ids "$WORK/b0")" ] && curl -s "$R2/metrics" | grep -q '^dsinfer_router_prefill_retries_total [1-9]' \
        && pass "failed prefill retried on another instance, output unchanged" || fail "retry: $(cat "$WORK/retry")"
    kill "$PID_R2" "$PID_BAD" 2>/dev/null
else
    echo "skip: make-model unavailable for the retry test"
fi

# ---------------------------------------------------------------- autoscaler: a standby joins under load
"$BIN" router --port 0 --prefill "$(U p1)" --decode "$(U d2)" --standby-decode "$(U d3)" --autoscale \
    --scale-up 0.01 --scale-down 0.001 --scale-hold 0.2 --scale-cooldown 30 --heartbeat 0.1 2>"$WORK/router3.log" &
PID_R3=$!; PIDS+=("$PID_R3")
R3="http://127.0.0.1:$(wait_port "$WORK/router3.log" "instances (deepseek LB)")"
g0=$(curl -s "$R3/metrics" | awk '$1 == "dsinfer_gpus" {print $2}')
for k in 1 2 3 4; do curl -s "$R3/v1/completions" -d "{\"prompt\":[1,2,$k],\"max_tokens\":600,\"ignore_eos\":true}" >/dev/null & done
joined=0
for _ in $(seq 1 60); do
    curl -s "$R3/admin/instances" | grep -q "\"url\":\"$(U d3)\",\"role\":\"decode\",\"member\":true" && { joined=1; break; }
    sleep 0.1
done
g1=$(curl -s "$R3/metrics" | awk '$1 == "dsinfer_gpus" {print $2}')
[ "$joined" = 1 ] && [ "$g0" = 16 ] && [ "$g1" = 24 ] && pass "autoscaler: standby decode joined, GPUs $g0 -> $g1 on /metrics" \
    || fail "autoscaler: joined=$joined gpus $g0 -> $g1"
curl -s "$R3/metrics" | grep -q '^dsinfer_gpu_cost_usd_total' && pass "GPU cost on the router's /metrics" || fail "no GPU cost metric"
curl -s "$R3/v1/pricing" | grep -q '"object":"pricing".*"next_change"' && pass "GET /v1/pricing on the router" ||
    fail "router /v1/pricing: $(curl -s "$R3/v1/pricing" | head -c 200)"
wait_jobs
kill "$PID_R3" 2>/dev/null
sleep 0.5   # fresh heartbeats: the decode LB then sees both instances idle

# ---------------------------------------------------------------- a decode instance dies under load
for k in $(seq 1 8); do
    curl -s -N "$R/v1/completions" -d "{\"prompt\":[$(ids_of 40 $((20 + k)))],\"max_tokens\":400,\"temperature\":0,\"ignore_eos\":true,\"stream\":true}" >"$WORK/k$k" &
done
# wait until both decode instances stream
for _ in $(seq 1 100); do
    r1=$(curl -s "$(U d1)/internal/load" | grep -o '"running":[0-9]*' | cut -d: -f2)
    r2=$(curl -s "$(U d2)/internal/load" | grep -o '"running":[0-9]*' | cut -d: -f2)
    [ "${r1:-0}" -gt 0 ] && [ "${r2:-0}" -gt 0 ] && [ "$(cat "$WORK"/k[0-9]* | grep -c '^data:')" -ge 16 ] && break
    sleep 0.05
done
kill -9 "$PID_D1"
wait_jobs
n_done=0; n_err=0; n_bad=0
for k in $(seq 1 8); do
    if grep -q '"finish_reason":"length"' "$WORK/k$k" && tail -2 "$WORK/k$k" | grep -q '\[DONE\]'; then n_done=$((n_done + 1))
    elif grep -q '^data: {"error":{"message":"the decode instance' "$WORK/k$k" && tail -2 "$WORK/k$k" | grep -q '\[DONE\]'; then n_err=$((n_err + 1))
    else n_bad=$((n_bad + 1)); echo "  stream $k: $(tail -c 200 "$WORK/k$k")"; fi
done
[ "$n_bad" = 0 ] && [ "$n_done" -ge 1 ] && [ "$n_err" -ge 1 ] \
    && pass "decode instance killed: $n_done streams completed on the other, $n_err ended with an error event + [DONE]" \
    || fail "decode kill: $n_done completed, $n_err error events, $n_bad neither"
# the dead instance leaves the pool; new requests still work
sleep 1
curl -s "$R/v1/completions" -d "${REQ[0]}" >"$WORK/after"
[ "$(body_ids "$WORK/after")" = "$(body_ids "$WORK/b0")" ] && pass "after the kill: requests served by the survivor" || fail "after kill: $(cat "$WORK/after")"
curl -s "$R/admin/instances" | grep -q "\"url\":\"$(U d1)\",\"role\":\"decode\",\"member\":true,\"state\":\"dead\"" \
    && pass "killed instance marked dead" || fail "dead state: $(curl -s "$R/admin/instances")"

# ---------------------------------------------------------------- clients that leave, a router that stops
# a non-streaming client hangs up while its request decodes: the router drops
# the decode call, and the decode instance cancels it (it generated to its end)
curl -s -m 1 "$R/v1/completions" -d "{\"prompt\":[$(ids_of 30 40)],\"max_tokens\":100000,\"ignore_eos\":true}" >/dev/null
for _ in $(seq 1 50); do
    run=$(curl -s "$(U d2)/internal/load" | grep -o '"running":[0-9]*' | cut -d: -f2)
    [ "${run:-1}" = 0 ] && break
    sleep 0.1
done
[ "${run:-1}" = 0 ] && pass "non-streaming client left: its decode request was cancelled" || fail "decode still running $run after the client left"
# ... and one that hangs up during a long prefill: the prefill instance stops it
# (it ran to its end, holding its blocks and the decode side's parked request)
curl -s -N -m 1 "$R/v1/completions" -d "{\"prompt\":[$(ids_of 16000 44)],\"max_tokens\":4,\"stream\":true}" >/dev/null
for _ in $(seq 1 40); do
    busy=0
    for n in p1 p2; do
        v=$(curl -s "$(U $n)/internal/load" | grep -o '"running":[0-9]*' | cut -d: -f2); busy=$((busy + ${v:-1}))
    done
    [ "$busy" = 0 ] && break
    sleep 0.1
done
[ "$busy" = 0 ] && pass "client left during the prefill: the prefill stopped" || fail "prefill still running after the client left"
# SIGTERM with requests in flight: they end with a 503 / an error event, and the router exits 0
"$BIN" router --port 0 --prefill "$(U p1)" --decode "$(U d2)" 2>"$WORK/router_t.log" &
PID_RT=$!
TPORT=$(wait_port "$WORK/router_t.log" "instances (deepseek LB)")
curl -s -m 30 -o "$WORK/t_ns" -w '%{http_code}' "http://127.0.0.1:$TPORT/v1/completions" \
    -d "{\"prompt\":[$(ids_of 30 41)],\"max_tokens\":20000,\"ignore_eos\":true}" >"$WORK/t_ns_code" &
curl -s -N -m 30 "http://127.0.0.1:$TPORT/v1/completions" \
    -d "{\"prompt\":[$(ids_of 30 42)],\"max_tokens\":20000,\"ignore_eos\":true,\"stream\":true}" >"$WORK/t_s" &
for _ in $(seq 1 100); do [ "$(grep -c '^data:' "$WORK/t_s")" -ge 3 ] && break; sleep 0.05; done
kill -TERM "$PID_RT"
wait "$PID_RT"; rc=$?
wait_jobs
[ "$rc" = 0 ] && [ "$(cat "$WORK/t_ns_code")" = 503 ] && grep -q "router is shutting down" "$WORK/t_ns" \
    && tail -2 "$WORK/t_s" | grep -q '\[DONE\]' && grep -q "router is shutting down" "$WORK/t_s" \
    && pass "router stopped with requests in flight: exit 0, 503 and an error event + [DONE]" \
    || fail "router stop: exit $rc, non-stream $(cat "$WORK/t_ns_code") $(head -c 200 "$WORK/t_ns"), stream $(tail -c 200 "$WORK/t_s")"

# ---------------------------------------------------------------- an API key on router and instances
serve kp prefill --api-key k9
serve kd decode --api-key k9
for n in kp kd; do
    port=$(wait_port "$WORK/$n.log" "model dsinfer-demo")
    [ -n "$port" ] || { echo "FAIL: $n did not start"; exit 1; }
    eval "PORT_$n=$port"
done
"$BIN" router --port 0 --api-key k9 --prefill "$(U kp)" --decode "$(U kd)" 2>"$WORK/routerk.log" &
PIDS+=("$!")
KPORT=$(wait_port "$WORK/routerk.log" "instances (deepseek LB)")
RK="http://127.0.0.1:$KPORT"
code() { curl -s -o /dev/null -w '%{http_code}' "$@"; }
[ "$(code "$RK/v1/completions" -d "${REQ[0]}")" = 401 ] && [ "$(code -H 'Authorization: Bearer no' "$RK/v1/completions" -d "${REQ[0]}")" = 401 ] \
    && [ "$(code "$RK/admin/instances")" = 401 ] && [ "$(code "$RK/health")" = 200 ] \
    && pass "router --api-key: 401 without it on /v1 and /admin, /health open" || fail "router key checks"
[ "$(code "$(U kp)/internal/load")" = 401 ] && [ "$(code -X POST "$(U kp)/internal/prefill?api=completions&xfer=1&decode=127.0.0.1:9" -d '{"prompt":[1]}')" = 401 ] \
    && pass "instance --api-key guards /internal" || fail "instance /internal without the key"
curl -s -H 'Authorization: Bearer k9' "$RK/v1/completions" -d "${REQ[0]}" >"$WORK/rk0"
[ "$(body_ids "$WORK/rk0")" = "$(body_ids "$WORK/b0")" ] && pass "with the key: router (which sends it on) = single server" \
    || fail "keyed router: $(head -c 300 "$WORK/rk0")"

# ---------------------------------------------------------------- a decode instance that hangs
# SIGSTOP keeps its connections open: once the heartbeats mark it dead, its
# stream ends with an error event (it went quiet until the client gave up)
serve d4 decode; PID_D4=$LAST_PID
PORT_d4=$(wait_port "$WORK/d4.log" "model dsinfer-demo")
"$BIN" router --port 0 --prefill "$(U p1)" --decode "$(U d4)" 2>"$WORK/router_h.log" &
PIDS+=("$!")
HPORT=$(wait_port "$WORK/router_h.log" "instances (deepseek LB)")
curl -s -N -m 30 "http://127.0.0.1:$HPORT/v1/completions" \
    -d "{\"prompt\":[$(ids_of 30 43)],\"max_tokens\":20000,\"ignore_eos\":true,\"stream\":true}" >"$WORK/h_s" &
CURL_H=$!
for _ in $(seq 1 100); do [ "$(grep -c '^data:' "$WORK/h_s")" -ge 3 ] && break; sleep 0.05; done
kill -STOP "$PID_D4"
wait "$CURL_H"; rc=$?
kill -CONT "$PID_D4"
[ "$rc" = 0 ] && grep -q '"code":"decode_instance_lost"' "$WORK/h_s" && tail -2 "$WORK/h_s" | grep -q '\[DONE\]' \
    && pass "hung decode instance: its stream ends with an error event + [DONE]" || fail "hung decode: curl $rc, $(tail -c 200 "$WORK/h_s")"

if [ "$FAILS" -ne 0 ]; then echo "e2e_pd: $FAILS failure(s)"; exit 1; fi
echo "e2e_pd: all passed"
