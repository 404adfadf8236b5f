#!/usr/bin/env bash
# dsinfer sim / report from the command line: exit codes and clear errors.
set -u
BIN="$1"
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
fail() { echo "FAIL: $*"; exit 1; }

out=$("$BIN" sim calc) || fail "sim calc exit $?"
echo "$out" | grep -q '\$87,072/day' || fail "cost not 87072: $out"
echo "$out" | grep -q '\$562,100/day' || fail "revenue not 562100"
echo "$out" | grep -q '545.6%' || fail "margin not 545.6%"

echo '{"models":{"m":{"input_cache_hit":-1,"input_cache_miss":1,"output":1}}}' > "$TMP/neg.json"
err=$("$BIN" sim calc --pricing "$TMP/neg.json" 2>&1); rc=$?
[ $rc -eq 1 ] || fail "bad pricing file: exit $rc"
echo "$err" | grep -q 'models.m.input_cache_hit: -1 is out of range' || fail "unclear error: $err"

echo '{"models":{"deepseek-r1":{"input_cache_hit":0.14,"input_cache_miss":0.55,"output":2.19}},"timezone":"CET"}' > "$TMP/tz.json"
err=$("$BIN" sim calc --pricing "$TMP/tz.json" 2>&1); rc=$?
[ $rc -eq 1 ] || fail "bad zone: exit $rc"
echo "$err" | grep -q "bad time zone 'CET'" || fail "unclear zone error: $err"

"$BIN" sim calc --bogus >/dev/null 2>&1; [ $? -eq 2 ] || fail "unknown option should exit 2"
"$BIN" sim frobnicate >/dev/null 2>&1; [ $? -eq 2 ] || fail "unknown mode should exit 2"
"$BIN" sim plan --gpu b200 >/dev/null 2>&1; [ $? -eq 2 ] || fail "unknown GPU should exit 2"
# an efficiency above the roofline is refused (100 used to run for minutes)
err=$(timeout 10 "$BIN" sim plan --eff-prefill 100 --eff-decode 100 2>&1 >/dev/null); rc=$?
[ $rc -eq 2 ] || fail "sim plan --eff-prefill 100: exit $rc"
echo "$err" | grep -q -- '--eff-prefill must be in (0, 1]' || fail "unclear efficiency error: $err"
"$BIN" report >/dev/null 2>&1; [ $? -eq 2 ] || fail "report without --journal should exit 2"
"$BIN" report --journal "$TMP/none.jsonl" >/dev/null 2>&1; [ $? -eq 1 ] || fail "missing journal should exit 1"
"$BIN" report --journal "$TMP/none.jsonl" --from yesterday >/dev/null 2>&1; [ $? -eq 2 ] || fail "bad time should exit 2"
for m in "" calc plan whatif fit pricing; do
  "$BIN" sim $m --help >/dev/null || fail "sim $m --help"
done
"$BIN" report --help >/dev/null || fail "report --help"
echo "e2e_econ: ok"
