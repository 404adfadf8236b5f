#!/usr/bin/env bash
# End-to-end test of the disk KV tier (`dsinfer serve --kv-disk DIR`) on the
# built-in demo model: a prompt served again after a restart comes from disk
# (>= 90% cache hits, identical output); a corrupted and a truncated block
# file are misses, are deleted and rewritten, and the output stays the same;
# two servers sharing one directory read each other's blocks; writes that
# fail leave the answers right, are logged once and counted; bad --kv-disk-*
# values are refused at start-up.
# Usage: bash e2e_kvdisk.sh path/to/dsinfer [data-dir]
set -u
BIN=${1:?usage: e2e_kvdisk.sh path/to/dsinfer [tests/data]}
WORK=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null; done; rm -rf "$WORK"; }
trap cleanup EXIT
FAILS=0
fail() { echo "FAIL: $*"; FAILS=$((FAILS + 1)); }
pass() { echo "ok: $*"; }

start_server() { # name dir extra-flags... ; sets URL_<name>, PID_<name>
    local name=$1 dir=$2
    shift 2
    rm -f "$WORK/$name.log" # the child truncates it only once forked: never read the last run's port
    "$BIN" serve --port 0 --threads 1 --kv-disk "$dir" "$@" 2>"$WORK/$name.log" &
    local pid=$! port=
    PIDS+=("$pid")
    for _ in $(seq 1 100); do
        port=$(sed -n 's/.*on http:\/\/127\.0\.0\.1:\([0-9]*\).*/\1/p' "$WORK/$name.log")
        [ -n "$port" ] && break
        sleep 0.1
    done
    [ -n "$port" ] || { cat "$WORK/$name.log"; echo "FAIL: server $name did not start"; exit 1; }
    eval "URL_$name=http://127.0.0.1:$port PID_$name=$pid"
}
stop_server() { # name: SIGTERM drains (disk writes included); the exit must be clean
    local pid_var="PID_$1"
    kill -TERM "${!pid_var}"
    wait "${!pid_var}" && pass "server $1 stopped cleanly" || fail "server $1 exit status $?"
}
metric() { curl -s "$1/metrics" | awk -v m="$2" '$1 == m { print $2 }'; }
ids_of() { # n seed -> comma list
    local n=$1 s=$2 out="" i
    for i in $(seq 0 $((n - 1))); do out="$out$(( (s * 131 + i * 37 + 11) % 2000 )),"; done
    echo "${out%,}"
}
complete() { # url prompt out-file
    curl -s "$1/v1/completions" -d "{\"prompt\":[$2],\"max_tokens\":12,\"temperature\":0,\"ignore_eos\":true,\"return_token_ids\":true}" >"$3"
}
body_ids() { grep -o '"token_ids":\[[0-9,]*\]' "$1" | head -1; }
json_int() { grep -o "\"$2\":[0-9]*" "$1" | head -1 | cut -d: -f2; }
wait_metric() { # url metric n: until the metric reaches n (writes are asynchronous)
    for _ in $(seq 1 100); do
        [ "$(metric "$1" "$2")" -ge "$3" ] 2>/dev/null && return 0
        sleep 0.05
    done
    return 1
}
wait_written() { wait_metric "$1" dsinfer_kv_disk_written_blocks_total "$2"; } # url n

# ---------------------------------------------------------------- bad flag values
# each is refused at start-up with exit 2 and a message naming the flag (the
# timeout only stops a server that wrongly started)
bad_flag() { # pattern flag...
    local pat=$1
    shift
    timeout 10 "$BIN" serve --port 0 --threads 1 --kv-disk "$WORK/flags" "$@" >"$WORK/flag.out" 2>&1
    local rc=$?
    [ "$rc" = 2 ] && grep -q -- "$pat" "$WORK/flag.out" && pass "refused: $*" || fail "$*: exit $rc: $(head -c 200 "$WORK/flag.out")"
}
for v in abc 5x nan inf -1 0; do bad_flag "kv-disk-gb" --kv-disk-gb "$v"; done
for v in abc 1s nan -1; do bad_flag "kv-disk-ttl" --kv-disk-ttl "$v"; done
for v in abc nan inf 1e300 -1; do bad_flag "kv-disk-rescan" --kv-disk-rescan "$v"; done
bad_flag "kv-disk-fsync" --kv-disk-fsync sometimes
bad_flag "kv-disk-io" --kv-disk-io aio
for f in --kv-disk-gb --kv-disk-ttl --kv-disk-rescan --kv-disk-fsync --kv-disk-io --kv-disk; do bad_flag "$f needs a value" "$f"; done

# 400 tokens: 6 full blocks (384 tokens = 96%) can come from the cache
P=$(ids_of 400 7)

# ---------------------------------------------------------------- restart
D1=$WORK/d1
start_server a "$D1"
complete "$URL_a" "$P" "$WORK/r1"
[ "$(json_int "$WORK/r1" prompt_cache_hit_tokens)" = 0 ] && pass "cold request: no cache hits" || fail "cold: $(cat "$WORK/r1")"
stop_server a
n_files=$(find "$D1" -name '*.kvb' | wc -l)
[ "$n_files" = 6 ] && pass "6 block files written" || fail "$n_files block files, want 6"
[ -z "$(find "$D1" -name '.tmp.*')" ] && pass "no temporary files left" || fail "temporary files left"

start_server a "$D1"
complete "$URL_a" "$P" "$WORK/r2"
hit=$(json_int "$WORK/r2" prompt_cache_hit_tokens)
[ "${hit:-0}" -ge 360 ] && pass "after restart: $hit of 400 prompt tokens from disk" || fail "after restart: hits '$hit': $(cat "$WORK/r2")"
[ -n "$(body_ids "$WORK/r1")" ] && [ "$(body_ids "$WORK/r1")" = "$(body_ids "$WORK/r2")" ] \
    && pass "same output after restart" || fail "output differs: $(body_ids "$WORK/r1") vs $(body_ids "$WORK/r2")"
[ "$(metric "$URL_a" dsinfer_kv_disk_hits_total)" = 6 ] && pass "6 disk hits in metrics" || fail "disk hits $(metric "$URL_a" dsinfer_kv_disk_hits_total)"
[ "$(metric "$URL_a" dsinfer_prompt_cache_disk_hit_tokens_total)" = 384 ] && [ "$(metric "$URL_a" dsinfer_prompt_cache_hit_tokens_total)" = 384 ] \
    && pass "disk tokens count as cache hits" || fail "cache-hit metrics: $(curl -s "$URL_a/metrics" | grep cache_)"
stop_server a

# ---------------------------------------------------------------- corrupt + truncate
# chain order from the headers: hash at byte 16, parent at byte 24; block 0's parent is 0
declare -A BY_PARENT
for f in $(find "$D1" -name '*.kvb'); do
    read -r h par < <(od -An -t x8 -j16 -N16 "$f")
    BY_PARENT[$((16#${par:-0}))]=$f
done
CHAIN=()
key=0
for _ in 1 2 3 4 5 6; do
    f=${BY_PARENT[$key]:-}
    [ -n "$f" ] || break
    CHAIN+=("$f")
    read -r h _ < <(od -An -t x8 -j16 -N8 "$f")
    key=$((16#$h))
done
if [ "${#CHAIN[@]}" = 6 ]; then
    pass "chain of 6 blocks read from the headers"
    size=$(stat -c %s "${CHAIN[1]}")
    # block 1: flip 16 bytes in the middle of the payload (same size: only the checksum can tell)
    printf '\xde\xad\xbe\xef\xde\xad\xbe\xef\xde\xad\xbe\xef\xde\xad\xbe\xef' |
        dd of="${CHAIN[1]}" bs=1 seek=$((size / 2)) conv=notrunc status=none
    # block 3: cut in half
    truncate -s $((size / 2)) "${CHAIN[3]}"
    start_server a "$D1"
    complete "$URL_a" "$P" "$WORK/r3"
    hit=$(json_int "$WORK/r3" prompt_cache_hit_tokens)
    [ "$hit" = 64 ] && pass "damaged blocks are misses (hits: block 0 only)" || fail "hits '$hit' with damaged blocks: $(cat "$WORK/r3")"
    [ "$(body_ids "$WORK/r1")" = "$(body_ids "$WORK/r3")" ] && pass "same output with damaged blocks" \
        || fail "output differs with damaged blocks: $(body_ids "$WORK/r3")"
    [ "$(metric "$URL_a" dsinfer_kv_disk_corrupt_blocks_total)" = 2 ] && pass "2 corrupt blocks dropped" \
        || fail "corrupt blocks $(metric "$URL_a" dsinfer_kv_disk_corrupt_blocks_total)"
    grep -q "dropped" "$WORK/a.log" && pass "damage logged" || fail "damage not logged"
    wait_written "$URL_a" 2 && pass "recomputed blocks rewritten" || fail "written $(metric "$URL_a" dsinfer_kv_disk_written_blocks_total)"
    complete "$URL_a" "$P" "$WORK/r4"
    stop_server a
    [ "$(stat -c %s "${CHAIN[3]}")" = "$size" ] && pass "truncated file replaced by a whole one" || fail "truncated file not replaced"
    start_server a "$D1"
    complete "$URL_a" "$P" "$WORK/r5"
    [ "$(json_int "$WORK/r5" prompt_cache_hit_tokens)" = 384 ] && [ "$(body_ids "$WORK/r1")" = "$(body_ids "$WORK/r5")" ] \
        && pass "repaired chain: all 6 blocks from disk, same output" || fail "after repair: $(cat "$WORK/r5")"
    curl -s -o /dev/null -w '%{http_code}' "$URL_a/health" | grep -q 200 && pass "server healthy" || fail "server unhealthy"
    stop_server a
else
    fail "could not order the chain (${#CHAIN[@]} blocks)"
fi

# ---------------------------------------------------------------- a cap below one byte
# is one byte (0 would be the 16 GiB default)
start_server a "$WORK/tiny" --kv-disk-gb 1e-12
[ "$(metric "$URL_a" dsinfer_kv_disk_capacity_bytes)" = 1 ] && pass "--kv-disk-gb 1e-12: a 1-byte cap" \
    || fail "--kv-disk-gb 1e-12: capacity $(metric "$URL_a" dsinfer_kv_disk_capacity_bytes)"
stop_server a

# ---------------------------------------------------------------- two servers, one directory
D2=$WORK/d2
start_server a "$D2"
start_server b "$D2" --kv-disk-io threads
Q1=$(ids_of 300 11)
Q2=$(ids_of 300 12)
complete "$URL_a" "$Q1" "$WORK/qa1"
wait_written "$URL_a" 4 || fail "server a did not write Q1's blocks"
complete "$URL_b" "$Q1" "$WORK/qb1"
[ "$(json_int "$WORK/qb1" prompt_cache_hit_tokens)" = 256 ] && pass "b reads a's blocks" || fail "b on Q1: $(cat "$WORK/qb1")"
[ "$(body_ids "$WORK/qa1")" = "$(body_ids "$WORK/qb1")" ] && pass "same output on a and b" || fail "Q1 output differs"
complete "$URL_b" "$Q2" "$WORK/qb2"
wait_written "$URL_b" 4 || fail "server b did not write Q2's blocks"
complete "$URL_a" "$Q2" "$WORK/qa2"
[ "$(json_int "$WORK/qa2" prompt_cache_hit_tokens)" = 256 ] && pass "a reads b's blocks" || fail "a on Q2: $(cat "$WORK/qa2")"
[ "$(body_ids "$WORK/qa2")" = "$(body_ids "$WORK/qb2")" ] && pass "same output on b and a" || fail "Q2 output differs"
grep -q "loads via io_uring\|io_uring unavailable" "$WORK/a.log" && grep -q "loads via threads" "$WORK/b.log" \
    && pass "backends: a $(grep -o 'loads via [a-z_]*' "$WORK/a.log"), b threads" || fail "backend log lines"
stop_server a
stop_server b

# ---------------------------------------------------------------- writes that fail
# every fan-out folder a file: each write fails (ENOTDIR, as on a full or
# read-only disk); answers stay right, one log line, a counter for the rest
D3=$WORK/d3
start_server a "$D3"
for sub in "$D3"/v1/*; do rmdir "$sub" && : >"$sub"; done
complete "$URL_a" "$P" "$WORK/w1"
[ "$(body_ids "$WORK/r1")" = "$(body_ids "$WORK/w1")" ] && pass "same output when writes fail" || fail "output with failing writes: $(cat "$WORK/w1")"
wait_metric "$URL_a" dsinfer_kv_disk_write_errors_total 6 && pass "6 write errors counted" \
    || fail "write errors $(metric "$URL_a" dsinfer_kv_disk_write_errors_total)"
[ "$(grep -c "cannot write" "$WORK/a.log")" = 1 ] && pass "failing writes logged once" || fail "$(grep -c "cannot write" "$WORK/a.log") 'cannot write' lines"
rm -f "$D3"/v1/* # the folders come back with the next writes
complete "$URL_a" "$Q1" "$WORK/w2"
wait_written "$URL_a" 4 && pass "writes work again" || fail "written $(metric "$URL_a" dsinfer_kv_disk_written_blocks_total) after the folders went"
grep -q "writes succeed again" "$WORK/a.log" && pass "recovery logged" || fail "recovery not logged"
stop_server a

[ "$FAILS" = 0 ] && echo "e2e_kvdisk: all passed" || echo "e2e_kvdisk: $FAILS failed"
exit $((FAILS > 0))
