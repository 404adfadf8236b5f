#!/usr/bin/env bash
# dsinfer eplb end to end: the README example, the output format, and clear
# errors (exit 1 for bad input, 2 for bad usage) on bad files and shapes.
# usage: bash e2e_eplb.sh <dsinfer> <tests/data>
set -u
BIN=$1
DATA=$2
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
fail=0
check() { # name, expected exit code, expected stderr fragment, command...
    local name=$1 want=$2 frag=$3
    shift 3
    "$@" >"$TMP/out" 2>"$TMP/err"
    local rc=$?
    if [ "$rc" != "$want" ]; then
        echo "FAIL $name: exit $rc, want $want; stderr: $(cat "$TMP/err")"
        fail=1
    elif [ -n "$frag" ] && ! grep -qi -- "$frag" "$TMP/err"; then
        echo "FAIL $name: stderr lacks '$frag': $(cat "$TMP/err")"
        fail=1
    else
        echo "ok   $name"
    fi
}
SHAPE="--slots 16 --groups 4 --nodes 2 --gpus 8"

check readme-deepseek 0 "" "$BIN" eplb --load "$DATA/eplb/readme_load.json" $SHAPE --policy deepseek
want='[5,6,5,7,8,4,3,4,10,9,10,2,0,1,11,1],[7,10,6,8,6,11,8,9,2,4,5,1,5,0,3,1]'
got=$(tr -d ' \n' <"$TMP/out" | sed -n 's/.*"phy2log":\[\(.*\)\],"log2phy".*/\1/p')
if [ "$got" != "$want" ]; then echo "FAIL readme phy2log: $got"; fail=1; else echo "ok   readme phy2log exact"; fi
for key in '"log2phy"' '"logcnt"' '"max_over_mean"'; do
    grep -q "$key" "$TMP/out" || { echo "FAIL output lacks $key"; fail=1; }
done
cp "$TMP/out" "$TMP/ds.json"

check best-default 0 "" "$BIN" eplb --load "$DATA/eplb/readme_load.json" $SHAPE
# best's max_over_mean never above deepseek's, layer by layer
mom() { tr -d ' \n' <"$1" | sed -n 's/.*"max_over_mean":\[\([^]]*\)\].*/\1/p' | tr ',' '\n'; }
if ! paste <(mom "$TMP/ds.json") <(mom "$TMP/out") | awk '{ if ($2 > $1 * (1 + 1e-9)) bad = 1 } END { exit bad }'; then
    echo "FAIL best above deepseek: $(mom "$TMP/ds.json" | tr '\n' ' ') vs $(mom "$TMP/out" | tr '\n' ' ')"
    fail=1
fi
check out-file 0 "" "$BIN" eplb --load "$DATA/eplb/readme_load.json" $SHAPE --out "$TMP/pl.json"
grep -q '"phy2log"' "$TMP/pl.json" || { echo "FAIL --out wrote nothing"; fail=1; }
check help 0 "" "$BIN" eplb --help

# bad input: exit 1 with a message naming the problem
printf '{"load": [[1, 2, 3], [4, 5]]}' >"$TMP/ragged.json"
printf '{"load": [[1, -2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]]}' >"$TMP/neg.json"
printf '{"load": [[1, NaN, 3]]}' >"$TMP/nan.json"
printf '{"load": [[1, 2, 3]' >"$TMP/trunc.json"
printf '{"loads": [[1, 2, 3]]}' >"$TMP/key.json"
printf '{"load": [[1, "x", 3]]}' >"$TMP/str.json"
check ragged 1 "entries" "$BIN" eplb --load "$TMP/ragged.json" $SHAPE
check negative 1 "negative" "$BIN" eplb --load "$TMP/neg.json" $SHAPE
check nan 1 "NaN" "$BIN" eplb --load "$TMP/nan.json" $SHAPE
check truncated 1 "malformed" "$BIN" eplb --load "$TMP/trunc.json" $SHAPE
check missing-key 1 "load" "$BIN" eplb --load "$TMP/key.json" $SHAPE
check string 1 "not a number" "$BIN" eplb --load "$TMP/str.json" $SHAPE
check no-file 1 "no such file" "$BIN" eplb --load "$TMP/none.json" $SHAPE
L="$DATA/eplb/readme_load.json"
check groups-divide 1 "groups" "$BIN" eplb --load "$L" --slots 16 --groups 5 --nodes 2 --gpus 8
check gpus-divide 1 "nodes" "$BIN" eplb --load "$L" --slots 16 --groups 4 --nodes 3 --gpus 8
check slots-divide 1 "slots" "$BIN" eplb --load "$L" --slots 18 --groups 4 --nodes 2 --gpus 8
check too-few-slots 1 "cannot hold" "$BIN" eplb --load "$L" --slots 8 --groups 4 --nodes 2 --gpus 8
check best-infeasible 1 "distinct" "$BIN" eplb --load "$L" --slots 16 --groups 4 --nodes 2 --gpus 2

# bad usage: exit 2
check no-args 2 "required" "$BIN" eplb
check bad-policy 2 "policy" "$BIN" eplb --load "$L" $SHAPE --policy fastest
check bad-number 2 "positive integer" "$BIN" eplb --load "$L" --slots x16 --groups 4 --nodes 2 --gpus 8
check zero 2 "positive integer" "$BIN" eplb --load "$L" --slots 0 --groups 4 --nodes 2 --gpus 8
check unknown-flag 2 "unknown option" "$BIN" eplb --load "$L" $SHAPE --fast
check missing-value 2 "needs a value" "$BIN" eplb --load "$L" $SHAPE --policy
exit $fail
