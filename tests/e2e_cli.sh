#!/usr/bin/env bash
# End-to-end checks of the dsinfer command line: help and version, usage
# errors (exit 2 with a message), greedy generation against the oracle's
# greedy0 continuation for both golden models, make-model -> inspect, the
# built-in demo, and a truncated checkpoint (exit 1 naming the file).
# Numeric flags take the whole value as a number: garbage, trailing
# characters, nan/inf and overflow exit 2 naming the flag.
#
#   bash tests/e2e_cli.sh <dsinfer binary> <tests/data dir>
#
# Prints one line per check; exits non-zero if any check failed.
set -u
BIN=${1:?usage: e2e_cli.sh <dsinfer binary> <tests/data dir>}
DATA=${2:?usage: e2e_cli.sh <dsinfer binary> <tests/data dir>}
TMP=$(mktemp -d /tmp/dsi-e2e-cli-XXXXXX)
trap 'rm -rf "$TMP"' EXIT
FAILED=0

pass() { echo "ok   - $1"; }
fail() { echo "FAIL - $1"; FAILED=$((FAILED + 1)); }

# expect_rc RC DESCRIPTION [grep-pattern-for-combined-output] -- command...
expect_rc() {
    local want=$1 what=$2 pattern=$3
    shift 4
    "$@" >"$TMP/out" 2>&1
    local rc=$?
    if [ "$rc" -ne "$want" ]; then
        fail "$what: exit $rc, expected $want ($(head -c 200 "$TMP/out" | tr '\n' ' '))"
    elif [ -n "$pattern" ] && ! grep -qE -- "$pattern" "$TMP/out"; then
        fail "$what: output lacks /$pattern/ ($(head -c 200 "$TMP/out" | tr '\n' ' '))"
    else
        pass "$what"
    fi
}

# golden_i32 FILE TENSOR: the int32 values of a 1-d tensor in a safetensors
# file, space-separated (little-endian host assumed, as everywhere in dsinfer).
golden_i32() {
    local f=$1 name=$2 hlen header entry b e
    hlen=$(od -An -v -t u8 -N 8 "$f" | tr -d ' ')
    header=$(head -c $((8 + hlen)) "$f" | tail -c "$hlen")
    entry=$(grep -oE "\"$name\": *\{[^}]*\}" <<<"$header")
    read -r b e < <(sed -E 's/.*"data_offsets": *\[ *([0-9]+) *, *([0-9]+) *\].*/\1 \2/' <<<"$entry")
    od -An -v -t d4 -j $((8 + hlen + b)) -N $((e - b)) "$f" | tr -s ' \n' ' ' | sed 's/^ //; s/ $//'
}

# --- help, version, usage ----------------------------------------------------
expect_rc 0 "dsinfer --help" "usage: dsinfer" -- "$BIN" --help
expect_rc 0 "dsinfer --version" "^dsinfer [0-9]+\.[0-9]+" -- "$BIN" --version
expect_rc 2 "dsinfer with no command" "usage" -- "$BIN"
expect_rc 2 "unknown command" "unknown command 'frobnicate'" -- "$BIN" frobnicate

# every subcommand listed by --help: --help exits 0, an unknown flag exits 2
COMMANDS=$("$BIN" --help | sed -n '/^commands:/,/^$/p' | sed -n 's/^  \([a-z][a-z0-9-]*\) .*/\1/p')
[ -n "$COMMANDS" ] && pass "--help lists commands: $(echo $COMMANDS)" || fail "--help lists no commands"
for c in $COMMANDS; do
    expect_rc 0 "dsinfer $c --help" "." -- "$BIN" "$c" --help
    expect_rc 2 "dsinfer $c --no-such-flag" "." -- "$BIN" "$c" --no-such-flag
done

G8="$DATA/golden/tiny-fp8"
G16="$DATA/golden/tiny-bf16"
expect_rc 2 "logits without --out" "required" -- "$BIN" logits --model "$G8" --ids 1,2
expect_rc 2 "logits without --ids" "required" -- "$BIN" logits --model "$G8" --out "$TMP/x"
expect_rc 2 "logits --ids without a value" "needs a value" -- "$BIN" logits --out "$TMP/x" --ids
expect_rc 2 "logits with a malformed id list" "ids" -- "$BIN" logits --model "$G8" --ids 1,x --out "$TMP/x"
expect_rc 2 "generate without --ids" "required" -- "$BIN" generate --model "$G8"
expect_rc 2 "generate -n 0" "positive" -- "$BIN" generate --model "$G8" --ids 1 -n 0
expect_rc 2 "make-model without --out" "required" -- "$BIN" make-model --preset tiny
expect_rc 2 "make-model with a bad preset" "preset" -- "$BIN" make-model --preset huge --out "$TMP/m"
expect_rc 2 "make-model with a bad dtype" "dtype" -- "$BIN" make-model --dtype fp4 --out "$TMP/m"
expect_rc 2 "inspect without a folder" "usage" -- "$BIN" inspect
expect_rc 1 "logits on a missing folder" "config.json" -- "$BIN" logits --model "$TMP/none" --ids 1 --out "$TMP/x"
expect_rc 1 "logits with an out-of-vocabulary id" "out of range" -- "$BIN" logits --model "$G8" --ids 1,4096 --out "$TMP/x"
expect_rc 2 "generate -n past INT_MAX tokens" "too large" -- "$BIN" generate --model "$G8" --ids 1,2 -n 2147483647
expect_rc 1 "logits --kv-tokens 2147483647" "too large" -- "$BIN" logits --model "$G8" --ids 1 --out "$TMP/x" --kv-tokens 2147483647

# --- numeric flags: the whole value or exit 2 --------------------------------
# Each is refused while the flags are parsed, before a model loads or a port
# opens, so each returns at once; the timeout only stops a command that wrongly
# started (atoi/atof read 'abc' as 0 and '4x' as 4 and ran).
# Lines: FLAG|VALUE|command and its other arguments (the flag goes last; @TMP
# is the scratch folder; without --model, the built-in model).
while IFS='|' read -r flag val cmd; do
    read -r -a args <<<"$cmd"
    args=("${args[@]//@TMP/$TMP}")
    timeout 20 "$BIN" "${args[@]}" "$flag" "$val" </dev/null >"$TMP/out" 2>"$TMP/err"
    rc=$?
    if [ "$rc" -eq 2 ] && grep -qE -- "^dsinfer [a-z -]+: $flag: '.*' is (not a (whole )?number|out of range)\$" "$TMP/err"; then
        pass "$cmd $flag '$val': exit 2 naming the flag"
    else
        fail "$cmd $flag '$val': exit $rc, expected 2 naming $flag ($(head -c 200 "$TMP/err" | tr '\n' ' '))"
    fi
done <<'NUMBERS'
--port|abc|serve --threads 1
--threads|4x|serve --port 0
--kv-cache-gb|nan|serve --port 0 --threads 1
--max-num-seqs|99999999999|serve --port 0 --threads 1
--drain-timeout|1e999|serve --port 0 --threads 1
--heartbeat|nan|router --port 0 --prefill http://127.0.0.1:9 --decode http://127.0.0.1:9
--port| 80|router --prefill http://127.0.0.1:9 --decode http://127.0.0.1:9
-n|1e3|generate --ids 1,2
--temperature|inf|generate --ids 1,2
--top-k||generate --ids 1,2
--threads|2x|generate --ids 1,2
--chunk||logits --ids 1,2 --out @TMP/num.f32
--decode-from|1.5|logits --ids 1,2 --out @TMP/num.f32
--kv-tokens|-|logits --ids 1,2 --out @TMP/num.f32
-n|1e3|generate --device cuda --ids 1,2
--chunk|x|logits --device cuda --ids 1,2 --out @TMP/num.f32
--shard-mb|2MB|make-model --preset tiny --out @TMP/num-model
--eff-decode|inf|sim plan
--iters|2x|sim fit
--bundle|64k|sim whatif
--batch-share|nan|sim pricing
--v3-share|0.5x|sim calc
--seed|abc|generate --ids 1,2
--seed|-1|generate --device cuda --ids 1,2
--seed|1e3|make-model --preset tiny --out @TMP/num-model
--seed|99999999999999999999|sim plan
NUMBERS
[ ! -e "$TMP/num.f32" ] && [ ! -e "$TMP/num-model" ] && pass "no output after a refused number" \
    || fail "a command with a refused number wrote its output"
expect_rc 2 "make-model --preset v3-layers:1x" "unknown preset" -- \
    timeout 20 "$BIN" make-model --preset v3-layers:1x --out "$TMP/num-model"
expect_rc 0 "sim calc --v3-share=0.25 --redundancy +2.5e0" "margin" -- "$BIN" sim calc --v3-share=0.25 --redundancy +2.5e0 --json

# --- greedy generation equals the oracle's greedy0 continuation --------------
for g in "$G8" "$G16"; do
    ids=$(golden_i32 "$g/golden.safetensors" greedy0.ids)
    n=$(wc -w <<<"$ids")
    if [ "$n" -ne 33 ]; then
        fail "read greedy0.ids from $g/golden.safetensors (got $n values)"
        continue
    fi
    prompt=$(cut -d' ' -f1-9 <<<"$ids" | tr ' ' ',')
    want=$(cut -d' ' -f10- <<<"$ids")
    got=$("$BIN" generate --model "$g" --ids "$prompt" -n 24 2>"$TMP/err")
    rc=$?
    if [ $rc -eq 0 ] && [ "$got" = "$want" ]; then
        pass "generate $(basename "$g") greedy0: 24 tokens equal the oracle's"
    else
        fail "generate $(basename "$g") greedy0: exit $rc, got '$got', want '$want' ($(cat "$TMP/err"))"
    fi
done

# --- make-model -> inspect -> logits ------------------------------------------
expect_rc 0 "make-model tiny fp8" "" -- "$BIN" make-model --preset tiny --dtype fp8 --out "$TMP/made" --shard-mb 2
nshards=$(ls "$TMP/made" 2>/dev/null | grep -c '^model-.*\.safetensors$')
[ "$nshards" -ge 3 ] && pass "make-model wrote $nshards shards and an index" || fail "make-model wrote $nshards shards"
[ -f "$TMP/made/model.safetensors.index.json" ] && [ -f "$TMP/made/config.json" ] \
    && pass "make-model wrote config.json and the index" || fail "make-model: config.json or index missing"
expect_rc 0 "inspect the made model" "fp8 e4m3 weights" -- "$BIN" inspect "$TMP/made"
expect_rc 0 "inspect golden tiny-bf16" "bf16 weights" -- "$BIN" inspect "$G16"
expect_rc 0 "logits on the made model" "" -- "$BIN" logits --model "$TMP/made" --ids 5,6,7 --out "$TMP/made.f32"
size=$(stat -c %s "$TMP/made.f32" 2>/dev/null || echo 0)
[ "$size" -eq $((3 * 2048 * 4)) ] && pass "logits file is 3 x 2048 float32" || fail "logits file is $size bytes"

# --- the built-in demo ---------------------------------------------------------
expect_rc 0 "demo" "greedy continuation" -- "$BIN" demo

# --- damaged checkpoints: exit 1, the file named -----------------------------
mkdir -p "$TMP/cut"
cp "$G8"/config.json "$G8"/model.safetensors.index.json "$G8"/model-*.safetensors "$TMP/cut/"
shard="$TMP/cut/model-00002-of-00003.safetensors"
truncate -s $(( $(stat -c %s "$shard") - 4096 )) "$shard"
expect_rc 1 "logits on a truncated shard" "model-00002-of-00003.safetensors.*truncated" -- \
    "$BIN" logits --model "$TMP/cut" --ids 1,2,3 --out "$TMP/cut.f32"
[ ! -e "$TMP/cut.f32" ] && pass "no output file after a failed load" || fail "an output file was written after a failed load"
expect_rc 1 "inspect a truncated shard" "model-00002-of-00003.safetensors" -- "$BIN" inspect "$TMP/cut"
truncate -s 100 "$shard"
expect_rc 1 "generate on a shard cut inside its header" "model-00002-of-00003.safetensors" -- \
    "$BIN" generate --model "$TMP/cut" --ids 1,2,3 -n 2
rm "$shard"
expect_rc 1 "logits with a shard missing" "model-00002-of-00003.safetensors" -- \
    "$BIN" logits --model "$TMP/cut" --ids 1 --out "$TMP/cut.f32"
echo '{"model_type": "llama"}' >"$TMP/cut/config.json"
expect_rc 1 "logits with an unsupported config" "config.json.*model_type" -- \
    "$BIN" logits --model "$TMP/cut" --ids 1 --out "$TMP/cut.f32"

if [ "$FAILED" -ne 0 ]; then
    echo "e2e_cli: $FAILED check(s) failed"
    exit 1
fi
echo "e2e_cli: all checks passed"
