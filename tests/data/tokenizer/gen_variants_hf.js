// Paths the golden tokenizer does not take, encoded by Hugging Face `tokenizers` 0.23.2
// (npm binding): ByteLevel with use_regex (the GPT-2 regex), ignore_merges, a template
// with a suffix token, and a char-level model with unk_token. Each variant is a patch
// over the golden tokenizer.json (replace these top-level keys / model keys), or a whole
// small tokenizer. Writes variants_hf.json next to this file.
//   NODE_PATH=/tmp/hf/node_modules node tests/data/tokenizer/gen_variants_hf.js
const fs = require('fs');
const path = require('path');
const { Tokenizer } = require('tokenizers');
const here = __dirname;
const golden = JSON.parse(fs.readFileSync(path.join(here, '..', 'golden', 'tokenizer', 'tokenizer.json'), 'utf8'));
const rnd = JSON.parse(fs.readFileSync(path.join(here, 'random_hf.json'), 'utf8'));
const texts = rnd.encode.map((c) => c.text).filter((t) => !t.includes('\0')).slice(0, 60)
  .concat(['the theme  a athe', 'Über the top!', "it's 'll 'Re  \n\n x", '  12345 6 \t\n ']);

const suffix = JSON.parse(JSON.stringify(golden.post_processor));
suffix.single.push({ SpecialToken: { id: '<｜end▁of▁sentence｜>', type_id: 0 } });
suffix.special_tokens['<｜end▁of▁sentence｜>'] = { id: '<｜end▁of▁sentence｜>', ids: [1], tokens: ['<｜end▁of▁sentence｜>'] };
const charVocab = { '<unk>': 0 };
let id = 1;
for (const c of 'abcdefghijklmnopqrstuvwxyz ') charVocab[c] = id++;
const charMerges = [['t', 'h'], ['th', 'e'], [' ', 'a']];
for (const [a, b] of charMerges) charVocab[a + b] = id++;

const variants = [
  { name: 'bytelevel-gpt2-regex', patch: { pre_tokenizer: { type: 'ByteLevel', add_prefix_space: false, trim_offsets: true, use_regex: true } } },
  { name: 'ignore-merges', model_patch: { ignore_merges: true } },
  { name: 'bos-and-eos-template', patch: { post_processor: suffix }, add_special: true },
  { name: 'char-level-unk', whole: { version: '1.0', added_tokens: [], normalizer: null, pre_tokenizer: null, post_processor: null,
    decoder: null, model: { type: 'BPE', vocab: charVocab, merges: charMerges, dropout: null, unk_token: '<unk>',
      continuing_subword_prefix: null, end_of_word_suffix: null, fuse_unk: false, byte_fallback: false, ignore_merges: false } } },
];

(async () => {
  const cases = [];
  for (let k = 0; k < variants.length; k++) {
    const v = variants[k];
    let json = v.whole;
    if (!json) {
      json = JSON.parse(JSON.stringify(golden));
      Object.assign(json, v.patch || {});
      Object.assign(json.model, v.model_patch || {});
    }
    const tok = Tokenizer.fromString(JSON.stringify(json));
    for (const text of texts)
      cases.push({ variant: k, text, ids: (await tok.encode(text, null, { addSpecialTokens: !!v.add_special })).getIds() });
  }
  const out = { oracle: `tokenizers (node) ${require('tokenizers/package.json').version}`, variants, cases };
  fs.writeFileSync(path.join(here, 'variants_hf.json'), JSON.stringify(out));
  console.log(`wrote ${cases.length} cases over ${variants.length} variants`);
})();
