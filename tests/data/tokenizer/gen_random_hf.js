// Encodes random and adversarial strings, and decodes random id sequences, with Hugging
// Face `tokenizers` (the node binding of the same Rust crate, version 0.23.2 like the
// golden oracle) on the golden tokenizer. Writes random_hf.json next to this file.
//   npm install --prefix /tmp/hf tokenizers@0.23.2
//   NODE_PATH=/tmp/hf/node_modules node tests/data/tokenizer/gen_random_hf.js
const fs = require('fs');
const path = require('path');
const { Tokenizer } = require('tokenizers');
const pkg = require('tokenizers/package.json');

const dir = path.join(__dirname, '..', 'golden', 'tokenizer');
const tok = Tokenizer.fromFile(path.join(dir, 'tokenizer.json'));

let seed = 12345;
function rnd() { // mulberry32
  seed = (seed + 0x6D2B79F5) | 0;
  let t = Math.imul(seed ^ (seed >>> 15), 1 | seed);
  t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
  return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
}
const pick = (a) => a[Math.floor(rnd() * a.length)];
const range = (lo, hi) => lo + Math.floor(rnd() * (hi - lo + 1));

const frags = ['<｜User｜>', '<｜Assistant｜>', '<think>', '</think>', '<｜', '｜>', '<｜end▁of▁sentence｜>',
  '\r\n', '  ', '\n\n', "'s", "n't", '1234', '3.14', '...', '```', '->', '==', '//', '/*', '#!', 'http://x.y/z?a=1'];
const ws = [0x20, 0x09, 0x0A, 0x0D, 0x0B, 0x0C, 0x85, 0xA0, 0x1680, 0x2000, 0x2009, 0x200A, 0x2028, 0x2029,
  0x202F, 0x205F, 0x3000, 0x200B, 0x200D, 0xFEFF, 0x180E];
const digits = [0x30, 0x660, 0x6F0, 0x966, 0xFF10, 0x2160, 0xBD, 0xB2, 0x2460, 0x1D7CE];
function randomText(maxChars) {
  const n = range(0, maxChars);
  let s = '';
  for (let i = 0; i < n; i++) {
    const r = rnd() * 100;
    let cp;
    if (r < 30) cp = range(0x20, 0x7E);
    else if (r < 40) cp = pick(ws);
    else if (r < 47) cp = pick(digits) + range(0, 9);
    else if (r < 53) cp = range(0xC0, 0x24F);
    else if (r < 56) cp = range(0x300, 0x36F);                  // combining marks
    else if (r < 62) cp = range(0x4E00, 0x9FA5);                // the CJK split's range
    else if (r < 64) cp = range(0x9FA6, 0x9FFF);                // CJK just past it
    else if (r < 68) cp = range(0x3040, 0x30FF);                // kana
    else if (r < 70) cp = range(0x3400, 0x4DBF);                // CJK extension A
    else if (r < 73) cp = range(0x0400, 0x04FF);                // Cyrillic
    else if (r < 75) cp = range(0x0600, 0x06FF);                // Arabic
    else if (r < 79) cp = range(0x1F300, 0x1FAFF);              // emoji
    else if (r < 82) cp = range(0x2000, 0x2BFF);                // punctuation, symbols
    else if (r < 84) cp = range(0xFF00, 0xFFEF);                // fullwidth
    else if (r < 86) cp = range(0, 0x1F);                       // controls, NUL
    else if (r < 93) { s += pick(frags); continue; }
    else { do cp = range(0, 0x10FFFF); while (cp >= 0xD800 && cp <= 0xDFFF); }
    s += String.fromCodePoint(cp);
  }
  return s;
}

const fixed = ['', ' ', '  ', '\n', ' \n ', 'a  b', 'a \n b', '\u00a0\u00a0x', 'x\u00a0', 'a\u0301\u0302b',
  'Ⅻ ½ ²³ ٣٤٥ １２３ ①②', '12345678901', '<｜User｜><｜User｜>', '<<｜User｜>>', '<｜User', 'x</think>y',
  '\r\r\n\n', '\t \t x', 'A.B,C;D', '!!!abc', '"quoted"', "it's", 'x\u200dy', '深度\n\n求索', 'ｱｲｳ',
  '\u3000\u3000字', 'price: $1,299.99!', 'tab\there', 'end with spaces   ', '   start', '\u0000\u0001'];

// cJSON strings end at NUL: texts holding one also carry their UTF-8 bytes in hex
const hex = (s) => Buffer.from(s, 'utf8').toString('hex');
const withHex = (o, key) => { if (o[key].includes('\0')) o[key + '_hex'] = hex(o[key]); return o; };
const cases = [];
async function main() {
  const texts = fixed.slice();
  for (let i = 0; i < 400; i++) texts.push(randomText(i < 350 ? 60 : 400));
  for (const text of texts) {
    const a = await tok.encode(text, null, { addSpecialTokens: false });
    const b = await tok.encode(text, null, { addSpecialTokens: true });
    cases.push(withHex({ text, ids: a.getIds(), ids_with_bos: b.getIds() }, 'text'));
  }
  const decodes = [];
  for (let i = 0; i < 150; i++) {
    const n = range(0, 40);
    const ids = [];
    for (let k = 0; k < n; k++) ids.push(rnd() < 0.1 ? range(0, 15) : range(16, 1999));
    const d = { ids, text: await tok.decode(ids, false), skip_special: await tok.decode(ids, true) };
    decodes.push(withHex(withHex(d, 'text'), 'skip_special'));
  }
  const out = { oracle: `tokenizers (node) ${pkg.version}`, encode: cases, decode: decodes };
  fs.writeFileSync(path.join(__dirname, 'random_hf.json'), JSON.stringify(out));
  console.log(`wrote ${cases.length} encode and ${decodes.length} decode cases`);
}
main();
