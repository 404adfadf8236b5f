#!/usr/bin/env bash
# Optional peer for bench_tokenizer: Hugging Face `tokenizers` on the same trained
# 128k-merge vocabulary and corpus. Checks that both produce identical ids and prints
# both throughputs. Needs node and the npm package (installed into /tmp/hf if missing).
# usage: bench/bench_tokenizer_hf.sh [build dir (default build)]
set -euo pipefail
cd "$(dirname "$0")/.."
B=${1:-build}
D=$(mktemp -d)
trap 'rm -rf "$D"' EXIT
[ -d /tmp/hf/node_modules/tokenizers ] || npm install --silent --prefix /tmp/hf tokenizers@0.23.2 >/dev/null
"$B/bench_tokenizer" --dump "$D" | grep -E "trained|tokens:|dsinfer \(|heap BPE \+"
NODE_PATH=/tmp/hf/node_modules node bench/bench_tokenizer_hf.js "$D"
"$B/dsinfer" tokenize --tokenizer "$D" <"$D/corpus.txt" >"$D/our_ids.txt"
if cmp -s "$D/our_ids.txt" "$D/hf_ids.txt"; then
    echo "ids: identical to HF tokenizers ($(wc -w <"$D/our_ids.txt") tokens)"
else
    echo "ids: DIFFER from HF tokenizers"
    exit 1
fi
