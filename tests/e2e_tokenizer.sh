#!/usr/bin/env bash
# End-to-end: the tokenize / detokenize / chat-render subcommands on the golden tokenizer.
# usage: bash e2e_tokenizer.sh <dsinfer binary> <tests/data dir>
set -u
BIN=$1
TOK=$2/golden/tokenizer
fail=0
check() { # name expected actual
    if [ "$2" != "$3" ]; then
        echo "FAIL $1: expected [$2] got [$3]"
        fail=1
    fi
}
status() { # name expected_rc actual_rc
    [ "$2" = "$3" ] || { echo "FAIL $1: exit code $3, expected $2"; fail=1; }
}

check "tokenize --bos" "0 1665 91 351 27 345 287 659 16" "$(printf 'Hello, world!' | "$BIN" tokenize --tokenizer "$TOK" --bos)"
check "tokenize" "3 87 88 4" "$(printf '<｜User｜>hi<｜Assistant｜>' | "$BIN" tokenize --tokenizer "$TOK")"
check "detokenize" "Hello, world!" "$(echo '1665 91 351 27 345 287 659 16' | "$BIN" detokenize --tokenizer "$TOK")"
check "detokenize --skip-special" "hi" "$(echo '0 3 87 88 4' | "$BIN" detokenize --tokenizer="$TOK" --skip-special)"

text=$'深度求索 🚀 tabs\tand\r\nlines\n\n  x**2 # done\n'
ids=$(printf '%s' "$text" | "$BIN" tokenize --tokenizer "$TOK")
back=$(printf '%s' "$ids" | "$BIN" detokenize --tokenizer "$TOK"; printf x)
check "round trip" "$text" "${back%x}"

msgs='[{"role":"system","content":"You are terse."},{"role":"user","content":"Hi"},{"role":"assistant","content":"<think>greet</think>Hello."},{"role":"user","content":"Bye"}]'
want=$'<｜begin▁of▁sentence｜>You are terse.<｜User｜>Hi<｜Assistant｜>Hello.<｜end▁of▁sentence｜><｜User｜>Bye<｜Assistant｜><think>\n'
got=$(printf '%s' "$msgs" | "$BIN" chat-render --tokenizer "$TOK"; printf x)
check "chat-render" "$want" "${got%x}"
check "chat-render --ids" "0 72 605 613 281 310 277 29 3 55 88 4 1665 91 351 29 1 3 49 104 84 4 5 214" \
    "$(printf '%s' "$msgs" | "$BIN" chat-render --tokenizer "$TOK" --ids)"
got=$(printf '{"messages":[{"role":"user","content":"x"}]}' | "$BIN" chat-render --tokenizer "$TOK" --no-generation-prompt)
check "chat-render request body" "<｜begin▁of▁sentence｜><｜User｜>x" "$got"

# usage and errors
"$BIN" tokenize --help >/dev/null; status "tokenize --help" 0 $?
"$BIN" chat-render --help >/dev/null; status "chat-render --help" 0 $?
"$BIN" tokenize </dev/null 2>/dev/null; status "tokenize without --tokenizer" 2 $?
"$BIN" detokenize --tokenizer "$TOK" --bogus </dev/null 2>/dev/null; status "unknown option" 2 $?
err=$(printf 'ab\xffcd' | "$BIN" tokenize --tokenizer "$TOK" 2>&1 >/dev/null); status "invalid UTF-8" 1 $?
case "$err" in *"UTF-8"*) ;; *) echo "FAIL invalid UTF-8 message: $err"; fail=1 ;; esac
echo '1 2 99999' | "$BIN" detokenize --tokenizer "$TOK" >/dev/null 2>&1; status "unknown id" 1 $?
echo '1 2 x' | "$BIN" detokenize --tokenizer "$TOK" >/dev/null 2>&1; status "not an id" 1 $?
echo 'hi' | "$BIN" tokenize --tokenizer /nonexistent >/dev/null 2>&1; status "missing tokenizer" 1 $?
echo '[{"role":"user"}]' | "$BIN" chat-render --tokenizer "$TOK" >/dev/null 2>&1; status "message without content" 1 $?
tmp=$(mktemp -d)
cp "$TOK/tokenizer.json" "$tmp/"
err=$(echo '[]' | "$BIN" chat-render --tokenizer "$tmp" 2>&1 >/dev/null); status "no chat template" 1 $?
case "$err" in *"chat_template"*) ;; *) echo "FAIL no-template message: $err"; fail=1 ;; esac
printf '{"model": {"type": "BPE", "vocab": {"a": 0}, "merges": ["a a"]}}' >"$tmp/tokenizer.json"
err=$(echo hi | "$BIN" tokenize --tokenizer "$tmp" 2>&1 >/dev/null); status "malformed tokenizer.json" 1 $?
case "$err" in *"merge"*) ;; *) echo "FAIL malformed message: $err"; fail=1 ;; esac
rm -rf "$tmp"

[ $fail = 0 ] && echo "e2e_tokenizer: all checks passed"
exit $fail
