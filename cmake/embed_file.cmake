# Writes a C source defining `const unsigned char NAME[]` and `const size_t NAME_len`
# from the bytes of INPUT (plus a NUL terminator not counted in the length).
# Usage: cmake -DINPUT=file -DOUTPUT=file.c -DNAME=symbol -P embed_file.cmake
file(READ "${INPUT}" hex HEX)
string(LENGTH "${hex}" hex_len)
math(EXPR n_bytes "${hex_len} / 2")
string(REGEX REPLACE "([0-9a-f][0-9a-f])" "0x\\1," body "${hex}")
string(REGEX REPLACE "((0x..,){24})" "\\1\n" body "${body}")
file(WRITE "${OUTPUT}.tmp"
  "/* Generated from ${INPUT} by cmake/embed_file.cmake; do not edit. */\n"
  "#include <stddef.h>\n"
  "const unsigned char ${NAME}[] = {\n${body}0x00};\n"
  "const size_t ${NAME}_len = ${n_bytes};\n")
file(RENAME "${OUTPUT}.tmp" "${OUTPUT}")
