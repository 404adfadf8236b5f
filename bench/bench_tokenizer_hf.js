// Peer check for bench_tokenizer: encodes DIR/corpus.txt with Hugging Face `tokenizers`
// (Rust, through its node binding) using DIR/tokenizer.json, prints its single-call
// throughput (process CPU time, best of 3) and writes the ids to DIR/hf_ids.txt.
// Run by bench/bench_tokenizer_hf.sh.
const fs = require('fs');
const { Tokenizer } = require('tokenizers');
const dir = process.argv[2];
const tok = Tokenizer.fromFile(`${dir}/tokenizer.json`);
const text = fs.readFileSync(`${dir}/corpus.txt`, 'utf8');
const bytes = Buffer.byteLength(text, 'utf8');
(async () => {
  let best = Infinity, ids;
  for (let r = 0; r < 3; r++) {
    const c0 = process.cpuUsage();
    const enc = await tok.encode(text, null, { addSpecialTokens: false });
    const c = process.cpuUsage(c0);
    best = Math.min(best, (c.user + c.system) / 1e6);
    ids = enc.getIds();
  }
  fs.writeFileSync(`${dir}/hf_ids.txt`, ids.join(' ') + '\n');
  console.log(`HF tokenizers ${require('tokenizers/package.json').version}, one call   ${(bytes / 1e6 / best).toFixed(1).padStart(8)} MB/s   (${ids.length} tokens)`);
})();
