#!/usr/bin/env bash
# Builds the tokenizer libFuzzer target with clang (ASan + UBSan) into build-fuzz/ and,
# given a number of seconds, runs it that long on a corpus seeded from the golden data.
# usage: tests/fuzz/build.sh [seconds]
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p build-fuzz/corpus
clang -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
    -DDSI_HAVE_PCRE2=1 -DDSI_VERSION='"fuzz"' -DDSI_SOURCE_DIR="\"$PWD\"" -Iinclude -Isrc \
    src/core/error.c src/tokenizer/*.c tests/fuzz/fuzz_tokenizer.c \
    $(pkg-config --cflags --libs libcjson libpcre2-8) -lm -lpthread -o build-fuzz/fuzz_tokenizer
G=tests/data/golden/tokenizer
{ printf '\0'; cat "$G/tokenizer.json"; } >build-fuzz/corpus/load
{ printf '\1'; printf 'def f(x):\n    return 深度 73.7k <｜User｜>'; } >build-fuzz/corpus/encode
{ printf '\2'; printf '[{"role":"user","content":"hi"},{"role":"assistant","content":null,"tool_calls":[{"type":"function","function":{"name":"f","arguments":"{}"}}]}]'; } >build-fuzz/corpus/chat
{ printf '\3'; printf '\xb2\x00\x83\x00\x05\x00'; } >build-fuzz/corpus/detok
{ printf '\4'; printf '\3<think>a</think>b'; } >build-fuzz/corpus/reason
if [ -n "${1:-}" ]; then
    build-fuzz/fuzz_tokenizer -max_total_time="$1" -max_len=200000 build-fuzz/corpus
fi
