#!/bin/bash
# dsinfer logits/generate --device cuda: usage errors exit 2; without a GPU
# (or without CUDA in the build) a clear message and exit 1; with a GPU the
# demo model's greedy tokens equal the CPU engine's.
set -u
BIN=$1
fail() { echo "FAIL: $*"; exit 1; }
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

"$BIN" logits --device tpu --ids 1 --out "$out/x" 2>"$out/err"; [ $? -eq 2 ] || fail "bad --device should exit 2"
grep -q "cpu or cuda" "$out/err" || fail "bad --device message"
"$BIN" logits --device cuda --help | grep -q -- "--gemm" || fail "--device cuda --help"
"$BIN" logits --device cuda --ids 1 2>"$out/err"; [ $? -eq 2 ] || fail "missing --out should exit 2"
"$BIN" logits --device cpu --ids 1,2 --out "$out/cpu.bin" || fail "--device cpu should run the CPU engine"

"$BIN" generate --device cuda --ids 5,6,7 -n 4 >"$out/gpu.txt" 2>"$out/err"
rc=$?
if [ $rc -ne 0 ]; then
    [ $rc -eq 1 ] || fail "no-GPU path should exit 1 (got $rc)"
    grep -q "no CUDA device" "$out/err" || fail "no-GPU message: $(cat "$out/err")"
    echo "no CUDA device: GPU comparison skipped ($(cat "$out/err"))"
    exit 0
fi
"$BIN" generate --ids 5,6,7 -n 4 >"$out/cpu.txt" 2>/dev/null || fail "cpu generate"
diff "$out/cpu.txt" "$out/gpu.txt" || fail "GPU greedy tokens differ from the CPU engine's"
echo "GPU greedy tokens equal the CPU engine's: $(cat "$out/gpu.txt")"
