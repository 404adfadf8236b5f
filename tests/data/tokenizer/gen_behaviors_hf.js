// Split behaviours (Removed, Isolated, MergedWithPrevious, MergedWithNext, Contiguous;
// invert; String and Regex patterns) and lstrip/rstrip/non-special added tokens, encoded
// by Hugging Face `tokenizers` 0.23.2 (npm binding). Every character pair is a merge, so
// piece boundaries show in the ids. Writes behaviors_hf.json next to this file.
//   npm install --prefix /tmp/hf tokenizers@0.23.2
//   NODE_PATH=/tmp/hf/node_modules node tests/data/tokenizer/gen_behaviors_hf.js
const fs = require('fs');
const path = require('path');
const { Tokenizer } = require('tokenizers');

const texts = ['a--b', '-a-', '--', 'ab', 'a-b--c---d', '- -', ' x <m>  y\t<m>z', '<m><m> <m>', 'x<n> <n>y', ''];
const chars = [...new Set(texts.join(''))];
const vocab = {};
let id = 0;
chars.forEach((c) => { vocab[c] = id++; });
const merges = [];
for (const a of chars) for (const b of chars) { vocab[a + b] = id++; merges.push([a, b]); }
vocab['<m>'] = id++;
vocab['<n>'] = id++;
const model = { type: 'BPE', vocab, merges, dropout: null, unk_token: null, continuing_subword_prefix: null,
  end_of_word_suffix: null, fuse_unk: false, byte_fallback: false, ignore_merges: false };
const added = (t) => Object.assign({ id: vocab[t.content], single_word: false, normalized: false, special: true,
  lstrip: false, rstrip: false }, t);

const configs = [];
for (const behavior of ['Removed', 'Isolated', 'MergedWithPrevious', 'MergedWithNext', 'Contiguous'])
  for (const invert of [false, true])
    for (const pattern of [{ String: '-' }, { Regex: '-+' }, { Regex: '-' }])
      configs.push({ pre_tokenizer: { type: 'Split', pattern, behavior, invert }, added_tokens: [] });
configs.push({ pre_tokenizer: null, added_tokens: [added({ content: '<m>', lstrip: true, rstrip: true }),
  added({ content: '<n>', lstrip: true, special: false })] });
configs.push({ pre_tokenizer: null, added_tokens: [added({ content: '<m>', rstrip: true }),
  added({ content: '<n>', rstrip: true, special: false })] });

(async () => {
  const cases = [];
  for (let k = 0; k < configs.length; k++) {
    const json = Object.assign({ version: '1.0', normalizer: null, post_processor: null, decoder: null, model }, configs[k]);
    const tok = Tokenizer.fromString(JSON.stringify(json));
    for (const text of texts)
      cases.push({ config: k, text, ids: (await tok.encode(text, null, { addSpecialTokens: false })).getIds() });
  }
  const out = { oracle: `tokenizers (node) ${require('tokenizers/package.json').version}`, model, configs, cases };
  fs.writeFileSync(path.join(__dirname, 'behaviors_hf.json'), JSON.stringify(out));
  console.log(`wrote ${cases.length} cases over ${configs.length} configurations`);
})();
