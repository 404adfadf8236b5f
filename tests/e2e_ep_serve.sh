#!/usr/bin/env bash
# dsinfer serve as an EP group: `mpirun -np 2 dsinfer serve` answers like one
# process (greedy, lossless f32 dispatch), stays up while idle for longer than
# its EP timeout (the scheduler's heartbeat steps), serves concurrent requests,
# and drains and exits 0 on SIGTERM to rank 0; with BF16 dispatch it answers
# like one process given the same --dispatch (both --batch-invariant); a rank
# that hangs mid-step gets the requests in flight answered with the reason
# (error event, 503) before the group ends non-zero.
# usage: bash e2e_ep_serve.sh <dsinfer> <tests/data>
set -u
BIN=$1
if ! command -v mpirun >/dev/null || ! command -v curl >/dev/null || ! "$BIN" --version | grep -q "parallelism: mpi"; then
    echo "skipped: needs mpirun, curl and a build with MPI"
    exit 0
fi
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
TMP=$(mktemp -d)
PIDS=""
killtree() { for c in $(pgrep -P "$1"); do killtree "$c"; done; kill -KILL "$1" 2>/dev/null; }
# the whole tree (timeout -> mpirun -> ranks): an orphaned rank would keep
# ctest waiting on its output
cleanup() { for p in $PIDS; do killtree "$p"; done; rm -rf "$TMP"; }
trap cleanup EXIT
fail=0
port_of() { # waits for the "on http://host:PORT" line in a log
    for _ in $(seq 1 150); do
        p=$(sed -n 's/.*on http:\/\/[^:]*:\([0-9]*\).*/\1/p' "$1" | head -1)
        [ -n "$p" ] && { echo "$p"; return 0; }
        sleep 0.2
    done
    return 1
}
FLAGS="--port 0 --threads 1 --kv-blocks 64"
"$BIN" serve $FLAGS 2>"$TMP/one.err" &
ONE=$!
PIDS="$ONE"
timeout 120 mpirun --oversubscribe -np 2 "$BIN" serve $FLAGS --dispatch f32 --ep-timeout-ms 4000 --eplb-every 4 \
    2>"$TMP/ep.err" &
EP=$!
PIDS="$PIDS $EP"
P1=$(port_of "$TMP/one.err") || { echo "FAIL single server did not start: $(cat "$TMP/one.err")"; exit 1; }
P2=$(port_of "$TMP/ep.err") || { echo "FAIL EP server did not start: $(cat "$TMP/ep.err")"; exit 1; }
sleep 6 # idle for longer than the EP timeout (4 s, with room for a loaded CI machine): only the heartbeat keeps the group alive
text() { sed -n 's/.*"text":"\(.*\)","logprobs".*/\1/p'; }
REQ='{"prompt":[5,17,99,300,41,7,8,9,10,11],"max_tokens":12,"temperature":0}'
a=$(curl -s "http://127.0.0.1:$P1/v1/completions" -d "$REQ" | text)
b=$(curl -s "http://127.0.0.1:$P2/v1/completions" -d "$REQ" | text)
if [ -n "$a" ] && [ "$a" = "$b" ]; then echo "ok   same greedy completion as one process after idling"; else
    echo "FAIL completions differ: '$a' vs '$b'; $(cat "$TMP/ep.err")"; fail=1; fi
for k in 1 2 3 4; do
    curl -s "http://127.0.0.1:$P2/v1/completions" -d "{\"prompt\":[$k,17,99],\"max_tokens\":6,\"temperature\":0}" >"$TMP/c$k" &
done
wait $(jobs -p | grep -v -e "^$ONE$" -e "^$EP$") 2>/dev/null
for k in 1 2 3 4; do
    want=$(curl -s "http://127.0.0.1:$P1/v1/completions" -d "{\"prompt\":[$k,17,99],\"max_tokens\":6,\"temperature\":0}" | text)
    got=$(text <"$TMP/c$k")
    if [ -n "$got" ] && [ "$got" = "$want" ]; then echo "ok   concurrent request $k"; else
        echo "FAIL concurrent request $k: '$got' vs '$want'"; fail=1; fi
done
# online EPLB reports per-layer balancedness before/after its last decision in /metrics
curl -s "http://127.0.0.1:$P2/metrics" >"$TMP/metrics"
if grep -q '^dsinfer_eplb_max_over_mean{moe_layer="0",placement="before"} ' "$TMP/metrics" &&
    grep -q '^dsinfer_eplb_max_over_mean{moe_layer="0",placement="after"} ' "$TMP/metrics" &&
    grep -q '^dsinfer_eplb_rebalances_total ' "$TMP/metrics"; then echo "ok   EPLB balancedness in /metrics"; else
    echo "FAIL no EPLB metrics: $(grep eplb "$TMP/metrics")"; fail=1; fi
# stop: SIGTERM to rank 0 drains, releases the other rank, everything exits 0
rank0() { # rank 0 of the group started as $1 (timeout -> mpirun -> ranks)
    for p in $(pgrep -P "$1") $(pgrep -P "$(pgrep -P "$1" | head -1)" 2>/dev/null); do
        tr '\0' '\n' <"/proc/$p/environ" 2>/dev/null | grep -q '^OMPI_COMM_WORLD_RANK=0$' && echo "$p"
    done
}
R0=$(rank0 "$EP")
if [ -z "$R0" ]; then echo "FAIL cannot find rank 0"; exit 1; fi
kill -TERM "$R0"
wait "$EP"
rc=$?
if [ "$rc" = 0 ] && grep -q "stopped" "$TMP/ep.err"; then echo "ok   SIGTERM to rank 0: group drained, exit 0"; else
    echo "FAIL group exit $rc: $(cat "$TMP/ep.err")"; fail=1; fi
kill -TERM "$ONE"
wait "$ONE"
# BF16 dispatch: the group answers like one process that rounds expert inputs
# and outputs the same way, both batch-invariant (bit-identical logits)
BF="--dispatch bf16 --batch-invariant"
"$BIN" serve $FLAGS $BF 2>"$TMP/one_bf.err" &
ONE=$!
timeout 120 mpirun --oversubscribe -np 2 "$BIN" serve $FLAGS $BF --ep-timeout-ms 20000 2>"$TMP/ep_bf.err" &
EP=$!
PIDS="$PIDS $ONE $EP"
P1=$(port_of "$TMP/one_bf.err") || { echo "FAIL bf16 single server did not start: $(cat "$TMP/one_bf.err")"; exit 1; }
P2=$(port_of "$TMP/ep_bf.err") || { echo "FAIL bf16 EP server did not start: $(cat "$TMP/ep_bf.err")"; exit 1; }
a=$(curl -s "http://127.0.0.1:$P1/v1/completions" -d "$REQ" | text)
b=$(curl -s "http://127.0.0.1:$P2/v1/completions" -d "$REQ" | text)
if [ -n "$a" ] && [ "$a" = "$b" ]; then echo "ok   bf16 dispatch: same greedy completion as one process"; else
    echo "FAIL bf16 completions differ: '$a' vs '$b'; $(cat "$TMP/ep_bf.err")"; fail=1; fi
kill -TERM "$ONE"
R0=$(rank0 "$EP")
[ -n "$R0" ] && kill -TERM "$R0"
wait "$EP" "$ONE"
# a rank that hangs mid-step (DSI_EP_FAULT): once the EP deadline passes, the
# requests in flight are answered with the reason (an error event and [DONE]
# when streaming, 503 otherwise) before the group ends, non-zero
DSI_EP_FAULT=1:1:hang timeout 60 mpirun --oversubscribe -np 2 "$BIN" serve $FLAGS --ep-timeout-ms 3000 \
    2>"$TMP/ep_hang.err" &
EP=$!
PIDS="$PIDS $EP"
P2=$(port_of "$TMP/ep_hang.err") || { echo "FAIL EP server (hang) did not start: $(cat "$TMP/ep_hang.err")"; exit 1; }
curl -sN -m 40 "http://127.0.0.1:$P2/v1/completions" -d '{"prompt":[5,17,99],"max_tokens":8,"stream":true}' \
    >"$TMP/hang_s" 2>&1 &
CS=$!
code=$(curl -s -m 40 -o "$TMP/hang_n" -w '%{http_code}' "http://127.0.0.1:$P2/v1/completions" \
    -d '{"prompt":[6,17,99],"max_tokens":8}')
wait "$CS"
if grep -q '^data: {"error":{"message":"engine step failed: expert parallelism failed: .*rank(s) 1' "$TMP/hang_s" &&
    tail -n 2 "$TMP/hang_s" | grep -q '^data: \[DONE\]$'; then echo "ok   hung rank: the stream ends with the reason and [DONE]"; else
    echo "FAIL hung rank: stream '$(head -c 400 "$TMP/hang_s")'"; fail=1; fi
if [ "$code" = 503 ] && grep -q 'expert parallelism failed' "$TMP/hang_n"; then echo "ok   hung rank: 503 naming expert parallelism"; else
    echo "FAIL hung rank: HTTP $code '$(head -c 300 "$TMP/hang_n")'"; fail=1; fi
wait "$EP"
rc=$?
if [ "$rc" != 0 ] && [ "$rc" != 124 ]; then echo "ok   hung rank: the group ended (exit $rc)"; else
    echo "FAIL hung rank: group exit $rc: $(tail -5 "$TMP/ep_hang.err")"; fail=1; fi
exit $fail
