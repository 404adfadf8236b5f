#!/usr/bin/env bash
# End-to-end test of `dsinfer serve` on the built-in demo model, over loopback:
# concurrent streaming and non-streaming requests equal `dsinfer generate`;
# usage counts; a repeated prompt hits the prefix cache; every bad input gets
# its status and an OpenAI error object; a client killed mid-stream (and one
# that gives up on a non-streaming request) frees its KV blocks; SIGTERM
# drains an in-flight stream. Usage: bash e2e_serve.sh path/to/dsinfer [data-dir]
set -u
BIN=${1:?usage: e2e_serve.sh path/to/dsinfer [tests/data]}
WORK=$(mktemp -d)
SRV_PID=
cleanup() { [ -n "$SRV_PID" ] && kill -9 "$SRV_PID" 2>/dev/null; rm -rf "$WORK"; }
trap cleanup EXIT
FAILS=0
fail() { echo "FAIL: $*"; FAILS=$((FAILS + 1)); }
pass() { echo "ok: $*"; }

start_server() { # args: extra flags; sets SRV_PID, URL
    # the child truncates the log only once forked: without this the loop
    # below could read the previous server's port (a rare flake under load)
    rm -f "$WORK/server.log"
    "$BIN" serve --port 0 --threads 1 "$@" 2>"$WORK/server.log" &
    SRV_PID=$!
    for _ in $(seq 1 100); do
        PORT=$(sed -n 's/.*on http:\/\/127\.0\.0\.1:\([0-9]*\).*/\1/p' "$WORK/server.log" 2>/dev/null)
        [ -n "$PORT" ] && break
        sleep 0.1
    done
    [ -n "$PORT" ] || { cat "$WORK/server.log"; echo "FAIL: server did not start"; exit 1; }
    URL="http://127.0.0.1:$PORT"
}
metric() { curl -s "$URL/metrics" | awk -v m="$1" '$1 == m { print $2 }'; }
# ids of a non-streaming body / of an SSE stream (return_token_ids)
body_ids() { grep -o '"token_ids":\[[0-9,]*\]' "$1" | head -1 | sed 's/.*\[\(.*\)\]/\1/' | tr ',' ' '; }
sse_ids() { grep -o '"token_ids":\[[0-9]*\]' "$1" | sed 's/.*\[\(.*\)\]/\1/' | tr '\n' ' ' | sed 's/ $//'; }
json_int() { grep -o "\"$2\":[0-9]*" "$1" | head -1 | cut -d: -f2; }

start_server --max-model-len 1024 --max-num-batched-tokens 256
echo "server on $URL"

# ---------------------------------------------------------------- basics
[ "$(curl -s -o /dev/null -w '%{http_code}' "$URL/health")" = 200 ] && pass health || fail health
curl -s "$URL/v1/models" | grep -q '"id":"dsinfer-demo"' && pass models || fail models
curl -s "$URL/v1/models" | grep -q '"max_model_len":1024' && pass "models max_model_len" || fail "models max_model_len"

# ---------------------------------------------------------------- concurrent requests vs generate
ids_of() { # n seed -> comma list
    local n=$1 s=$2 out="" i
    for i in $(seq 0 $((n - 1))); do out="$out$(( (s * 131 + i * 37 + 11) % 2000 )),"; done
    echo "${out%,}"
}
declare -a P N
P[0]=$(ids_of 5 1); N[0]=12
P[1]=$(ids_of 40 2); N[1]=20
P[2]=$(ids_of 90 3); N[2]=16
P[3]=$(ids_of 17 4); N[3]=24
P[4]=$(ids_of 70 5); N[4]=10
P[5]=$(ids_of 33 6); N[5]=18
for k in 0 1 2 3 4 5; do
    stream=$([ $((k % 2)) = 0 ] && echo true || echo false)
    curl -s -N "$URL/v1/completions" -H 'Content-Type: application/json' \
        -d "{\"model\":\"dsinfer-demo\",\"prompt\":[${P[$k]}],\"max_tokens\":${N[$k]},\"temperature\":0,\"ignore_eos\":true,\"return_token_ids\":true,\"stream\":$stream,\"stream_options\":{\"include_usage\":true}}" \
        >"$WORK/r$k" &
done
wait_jobs() { for j in $(jobs -p); do [ "$j" != "$SRV_PID" ] && wait "$j"; done; }
wait_jobs
for k in 0 1 2 3 4 5; do
    want=$("$BIN" generate --threads 1 --ids "${P[$k]}" -n "${N[$k]}" 2>/dev/null)
    if [ $((k % 2)) = 0 ]; then got=$(sse_ids "$WORK/r$k"); else got=$(body_ids "$WORK/r$k"); fi
    [ "$got" = "$want" ] && pass "request $k equals generate" || fail "request $k: got '$got' want '$want'"
    np=$(echo "${P[$k]}" | tr ',' '\n' | wc -l)
    [ "$(json_int "$WORK/r$k" prompt_tokens)" = "$np" ] && [ "$(json_int "$WORK/r$k" completion_tokens)" = "${N[$k]}" ] \
        && [ "$(json_int "$WORK/r$k" total_tokens)" = $((np + N[k])) ] \
        && pass "request $k usage" || fail "request $k usage: $(grep -o '"usage":{[^}]*}' "$WORK/r$k")"
done
grep -q '^data: \[DONE\]' "$WORK/r0" && pass "stream ends with [DONE]" || fail "stream has no [DONE]"
grep -q '"finish_reason":"length"' "$WORK/r1" && pass "finish_reason length" || fail "finish_reason"

# ---------------------------------------------------------------- prefix cache
LONG=$(ids_of 200 9)
for round in 1 2; do
    curl -s "$URL/v1/completions" -d "{\"prompt\":[$LONG],\"max_tokens\":4,\"temperature\":0}" >"$WORK/c$round"
done
hit1=$(json_int "$WORK/c1" prompt_cache_hit_tokens); hit2=$(json_int "$WORK/c2" prompt_cache_hit_tokens)
miss2=$(json_int "$WORK/c2" prompt_cache_miss_tokens)
[ "$hit1" = 0 ] && [ "$hit2" = 192 ] && [ "$miss2" = 8 ] && pass "repeated prompt: cache hit $hit2 tokens" \
    || fail "cache hits: first $hit1, second $hit2 (miss $miss2)"
[ "$(metric dsinfer_prompt_cache_hit_tokens_total)" -ge 192 ] && pass "cache-hit metric" || fail "cache-hit metric"

# ---------------------------------------------------------------- chat
curl -s "$URL/v1/chat/completions" -d '{"messages":[{"role":"user","content":"Hello!"}],"max_tokens":6,"seed":1}' >"$WORK/chat"
grep -q '"object":"chat.completion"' "$WORK/chat" && grep -q '"reasoning_content":' "$WORK/chat" \
    && grep -q '"role":"assistant"' "$WORK/chat" && pass "chat completion (R1: reasoning_content)" || fail "chat: $(cat "$WORK/chat")"
curl -s -N "$URL/v1/chat/completions" -d '{"messages":[{"role":"user","content":"Hi"}],"max_tokens":5,"stream":true,"logprobs":true,"top_logprobs":3}' >"$WORK/chats"
grep -q '"delta":{"role":"assistant"' "$WORK/chats" && grep -q '"top_logprobs":\[{' "$WORK/chats" \
    && tail -2 "$WORK/chats" | grep -q '\[DONE\]' && pass "chat stream with logprobs" || fail "chat stream: $(head -c 600 "$WORK/chats")"
# a stop string is cut from the output: stop on the text of the 3rd greedy token
curl -s "$URL/v1/completions" -d "{\"prompt\":[${P[1]}],\"max_tokens\":${N[1]},\"temperature\":0,\"ignore_eos\":true,\"logprobs\":0}" >"$WORK/nostop"
STOPTXT=$(grep -o '"tokens":\["[^"]*","[^"]*","[^"\\]*"' "$WORK/nostop" | sed 's/.*,"\([^"]*\)"$/\1/')
if [ -n "$STOPTXT" ]; then
    curl -s "$URL/v1/completions" -d "{\"prompt\":[${P[1]}],\"max_tokens\":${N[1]},\"temperature\":0,\"ignore_eos\":true,\"stop\":[\"$STOPTXT\"]}" >"$WORK/stop"
    grep -q '"finish_reason":"stop"' "$WORK/stop" && ! grep -o '"text":"[^"]*"' "$WORK/stop" | grep -qF "$STOPTXT" \
        && pass "stop string '$STOPTXT' ends the completion, not included" || fail "stop: $(cat "$WORK/stop")"
fi

# ---------------------------------------------------------------- bad input
check_err() { # name status curl-args...
    local name=$1 want=$2; shift 2
    local code
    code=$(curl -s -o "$WORK/err" -w '%{http_code}' "$@")
    if [ "$code" = "$want" ] && grep -q '^{"error":{"message":"[^"]' "$WORK/err" && grep -q '"type":"' "$WORK/err"; then
        pass "$name -> $code"
    else
        fail "$name: status $code (want $want), body $(head -c 300 "$WORK/err")"
    fi
}
C="$URL/v1/completions"
check_err "malformed JSON" 400 "$C" -d '{"prompt": [1,2'
check_err "body not an object" 400 "$C" -d '[1,2,3]'
check_err "max_tokens wrong type" 400 "$C" -d '{"prompt":"hi","max_tokens":"ten"}'
check_err "temperature wrong type" 400 "$C" -d '{"prompt":"hi","temperature":"hot"}'
check_err "prompt wrong type" 400 "$C" -d '{"prompt":{"a":1}}'
check_err "stream wrong type" 400 "$C" -d '{"prompt":"hi","stream":"yes"}'
check_err "messages missing" 400 "$URL/v1/chat/completions" -d '{"model":"dsinfer-demo"}'
check_err "max_tokens 0" 400 "$C" -d '{"prompt":"hi","max_tokens":0}'
check_err "max_tokens negative" 400 "$C" -d '{"prompt":"hi","max_tokens":-5}'
check_err "prompt longer than the context" 400 "$C" -d "{\"prompt\":[$(ids_of 1100 3)]}"
check_err "prompt + max_tokens beyond the context" 400 "$C" -d "{\"prompt\":[$(ids_of 1000 3)],\"max_tokens\":100}"
check_err "token id out of vocabulary" 400 "$C" -d '{"prompt":[1,2,99999]}'
check_err "unknown model" 404 "$C" -d '{"model":"gpt-9","prompt":"hi"}'
grep -q '"code":"model_not_found"' "$WORK/err" && pass "unknown model code" || fail "unknown model code"
head -c $((9 * 1024 * 1024)) /dev/zero | tr '\0' 'a' >"$WORK/big"
check_err "oversized body" 413 "$C" -H 'Content-Type: application/json' --data-binary @"$WORK/big"
check_err "unknown endpoint" 404 "$URL/v1/nothing"
check_err "wrong method" 405 -X GET "$C"
[ "$(curl -s -o /dev/null -w '%{http_code}' "$URL/health")" = 200 ] && pass "alive after bad input" || fail "server died"

# ---------------------------------------------------------------- stalled clients block no one
idle_check() { # name: waits for the batch and the KV to be idle again
    local used run i
    for i in $(seq 1 50); do
        used=$(metric dsinfer_kv_blocks_used); run=$(metric dsinfer_requests_running)
        [ "$used" = 0 ] && [ "$run" = 0 ] && break
        sleep 0.1
    done
    [ "$used" = 0 ] && [ "$run" = 0 ] && pass "$1: blocks freed, batch idle" || fail "$1: kv used $used, running $run"
}
# one client sends half a request and stalls; another asks for a long stream and never reads
exec 3<>"/dev/tcp/127.0.0.1/$PORT"
printf 'POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"prompt":' >&3
exec 4<>"/dev/tcp/127.0.0.1/$PORT"
body='{"prompt":[5,6,7],"max_tokens":900,"stream":true,"ignore_eos":true}'
printf 'POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s' "${#body}" "$body" >&4
code=$(curl -s -m 10 -o "$WORK/other" -w '%{http_code}' "$URL/v1/completions" -d '{"prompt":[1,2],"max_tokens":3}')
[ "$code" = 200 ] && pass "stalled clients do not block others" || fail "request beside stalled clients: $code"
exec 3>&- 4>&-
idle_check "stalled clients closed"
# a body in a coding the server cannot read is refused at once (it hung before)
exec 3<>"/dev/tcp/127.0.0.1/$PORT"
printf 'POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\nConnection: close\r\n\r\nxyz' >&3
status=$(timeout 10 head -1 <&3 | tr -d '\r')
exec 3>&-
[ "$status" = "HTTP/1.1 501 Not Implemented" ] && pass "Transfer-Encoding gzip: 501" || fail "Transfer-Encoding gzip: '$status'"
exec 3<>"/dev/tcp/127.0.0.1/$PORT"
printf 'GET /health HTTP/1.1\r\nConnection: close\r\n\r\n' >&3
status=$(timeout 10 head -1 <&3 | tr -d '\r')
exec 3>&-
[ "$status" = "HTTP/1.1 400 Bad Request" ] && pass "HTTP/1.1 without Host: 400" || fail "no Host: '$status'"

# ---------------------------------------------------------------- disconnects free blocks
before=$(metric 'dsinfer_requests_total{outcome="cancelled"}')
: >"$WORK/killed"
curl -s -N "$URL/v1/completions" -d "{\"prompt\":[$(ids_of 100 11)],\"max_tokens\":900,\"stream\":true,\"ignore_eos\":true}" >"$WORK/killed" &
CURL=$!
for _ in $(seq 1 50); do [ "$(grep -c '^data:' "$WORK/killed")" -ge 3 ] && break; sleep 0.05; done
[ "$(metric dsinfer_kv_blocks_used)" -gt 0 ] && pass "streaming request holds blocks" || fail "no blocks in use mid-stream"
kill -9 $CURL; wait $CURL 2>/dev/null
idle_check "client killed mid-stream"
# (a 900-token request takes >= 0.25 s here even on a fast machine; the client gives up at 0.1 s)
curl -s -m 0.1 "$URL/v1/completions" -d "{\"prompt\":[$(ids_of 100 12)],\"max_tokens\":900,\"ignore_eos\":true}" >/dev/null
idle_check "non-streaming client gave up"
after=$(metric 'dsinfer_requests_total{outcome="cancelled"}')
[ $((after - before)) = 2 ] && pass "both counted as cancelled" || fail "cancelled went $before -> $after"

# ---------------------------------------------------------------- metrics format
curl -s "$URL/metrics" >"$WORK/metrics"
for m in dsinfer_time_to_first_token_seconds_bucket dsinfer_inter_token_latency_seconds_count \
         dsinfer_requests_waiting dsinfer_kv_blocks_free dsinfer_generation_tokens_total; do
    grep -q "^$m" "$WORK/metrics" || fail "metric $m missing"
done
awk '/^#/ { next } NF != 2 { bad = 1 } END { exit bad }' "$WORK/metrics" && pass "metrics lines are 'name value'" \
    || fail "malformed metrics line"
PROMTOOL=${PROMTOOL:-$(command -v promtool)}   # optional: Debian's prometheus .deb has it
if [ -n "$PROMTOOL" ] && [ -x "$PROMTOOL" ]; then
    "$PROMTOOL" check metrics <"$WORK/metrics" && pass "promtool check metrics" || fail "promtool check metrics"
fi

# ---------------------------------------------------------------- SIGTERM drains
: >"$WORK/drain"
curl -s -N "$URL/v1/completions" -d "{\"prompt\":[1,2,3],\"max_tokens\":400,\"stream\":true,\"ignore_eos\":true,\"temperature\":0}" >"$WORK/drain" &
CURL=$!
for _ in $(seq 1 50); do [ "$(grep -c '^data:' "$WORK/drain")" -ge 3 ] && break; sleep 0.05; done
kill -TERM "$SRV_PID"
wait $CURL
wait "$SRV_PID"; rc=$?
SRV_PID=
grep -q '"finish_reason":"length"' "$WORK/drain" && tail -2 "$WORK/drain" | grep -q '\[DONE\]' \
    && pass "SIGTERM: in-flight stream completed" || fail "SIGTERM: stream cut: $(tail -c 300 "$WORK/drain")"
[ "$rc" = 0 ] && pass "SIGTERM: exit 0" || fail "SIGTERM: exit $rc"

# ---------------------------------------------------------------- API key, queue limit
start_server --api-key sekret --max-num-seqs 1 --max-queue 1
code=$(curl -s -o "$WORK/err" -w '%{http_code}' "$URL/v1/models")
[ "$code" = 401 ] && grep -q '"error"' "$WORK/err" && pass "no key -> 401" || fail "no key: $code"
code=$(curl -s -o /dev/null -w '%{http_code}' -H 'Authorization: Bearer sekret' "$URL/v1/models")
[ "$code" = 200 ] && pass "key -> 200" || fail "key: $code"
for k in 1 2 3 4; do
    curl -s -o "$WORK/q$k" -w '%{http_code}\n' -H 'Authorization: Bearer sekret' "$URL/v1/completions" \
        -d '{"prompt":[1,2,3],"max_tokens":300,"ignore_eos":true}' >"$WORK/qc$k" &
done
wait_jobs
n429=$(cat "$WORK"/qc* | grep -c 429); n200=$(cat "$WORK"/qc* | grep -c 200)
[ "$n429" -ge 1 ] && [ $((n429 + n200)) = 4 ] && pass "queue full -> 429 ($n200 served, $n429 refused)" \
    || fail "queue limit: $(cat "$WORK"/qc* | tr '\n' ' ')"
kill -TERM "$SRV_PID"; wait "$SRV_PID"; SRV_PID=

# ---------------------------------------------------------------- a KV pool too small for the load
# 8 blocks (512 tokens) for 6 requests of 100 + 150 tokens: admission waits and
# decode preempts, but every request completes with all its tokens
start_server --kv-blocks 8 --max-model-len 512
for k in 1 2 3 4 5 6; do
    curl -s "$URL/v1/completions" -d "{\"prompt\":[$(ids_of 100 $((30 + k)))],\"max_tokens\":150,\"ignore_eos\":true}" >"$WORK/p$k" &
done
wait_jobs
n_ok=$(grep -l '"completion_tokens":150' "$WORK"/p? | wc -l)
pre=$(metric dsinfer_preemptions_total)
[ "$n_ok" = 6 ] && pass "small KV pool: 6/6 completed ($pre preemptions)" ||
    fail "small KV pool: $n_ok/6 completed; first reply: $(head -c 300 "$WORK/p1"); server: $(tail -5 "$WORK/server.log")"
idle_check "small KV pool"
kill -TERM "$SRV_PID"; wait "$SRV_PID"; SRV_PID=

if [ "$FAILS" -ne 0 ]; then echo "e2e_serve: $FAILS failure(s)"; exit 1; fi
echo "e2e_serve: all passed"
