#!/bin/bash
# Runs the CUDA backend's tests and benchmarks on a machine with a GPU from
# binaries built elsewhere (the GPU machine may lack our Debian libraries):
#   scripts/gpu-check.sh BIN_DIR LIB_DIR [steps...]
# steps: test e2e bench quick model:N (default: test e2e quick).
# Logs go to $OUT (or ./gpu-out). The binaries read tests/data from
# DSI_SOURCE_DIR as compiled in; a symlink makes that path this checkout.
set -u
BIN=$(cd "$1" && pwd); LIB=$(cd "$2" && pwd); shift 2
OUTD=${OUT:-$PWD/gpu-out}; mkdir -p "$OUTD"
export LD_LIBRARY_PATH="$LIB:/usr/local/cuda/lib64:/usr/local/cuda/lib:${LD_LIBRARY_PATH:-}"
src=$(strings "$BIN/test_cuda" | grep -m1 -o '^/[^ ]*/tests/data' | sed 's,/tests/data$,,')
if [ -n "$src" ] && [ ! -e "$src/tests/data" ]; then mkdir -p "$(dirname "$src")"; ln -sfn "$PWD" "$src"; fi
df -h /tmp /dev/shm | tail -n +2; nproc
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv,noheader
steps=${*:-test e2e quick}
for s in $steps; do
    echo "=== $s $(date +%T)"
    case $s in
    test) timeout 300 "$BIN/test_cuda" 2>&1 | tee "$OUTD/test_cuda.log" ;;
    e2e) timeout 120 bash tests/e2e_cuda.sh "$BIN/dsinfer" 2>&1 | tee "$OUTD/e2e.log" ;;
    quick) timeout 300 "$BIN/bench_cuda" --quick 2>&1 | tee "$OUTD/bench_quick.log" ;;
    probe) timeout 60 "$BIN/bench_cuda" --lt-probe 2>&1 | tee "$OUTD/probe.log" ;;
    py:*) timeout 200 python3 "${s#py:}" 2>&1 | tee "$OUTD/py.log" ;;
    bench) timeout 500 "$BIN/bench_cuda" 2>&1 | tee "$OUTD/bench.log" ;;
    model:*) n=${s#model:}; d=${MODEL_ROOT:-/tmp}/v3l$n
        [ -d "$d" ] || timeout 400 "$BIN/dsinfer" make-model --preset "v3-layers:$n" --dtype fp8 --out "$d" || exit 1
        timeout 500 "$BIN/bench_cuda" --model "$d" 2>&1 | tee "$OUTD/bench_model$n.log" ;;
    *) echo "unknown step $s"; exit 2 ;;
    esac
    echo "=== $s rc=${PIPESTATUS[0]}"
done
