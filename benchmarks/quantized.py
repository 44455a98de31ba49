"""QuantizedCache vs DynamicCache vs transformers' QuantizedCache backends, on the real model, in one run.

Measures, for every cache spec:
- perplexity on WikiText-2 test, first 2048 and 4096 tokens fed in chunks of 64 (one 4096-token pass:
  with causal chunks, its first 2048 predictions are exactly those of a 2048-token run);
- perplexity token-by-token over the first 1024 tokens (each token sees only the cache);
- bytes the cache holds at 4096 tokens when the KV is fp16 (the pass's real KV, cast to fp16 and
  replayed through a fresh cache: the model itself runs in fp32 on CPU), all in: codes, scales, minimums,
  outliers, sink and residual tokens;
- decode tokens/s at 1K and 4K context, as a ratio to DynamicCache in the same run.

The default specs are the quality levers of `QuantizedCache` at each width (smaller key blocks, key
outliers kept apart, the normal codebook, key bits apart, calibrated per-layer profiles from
`hf-kvcache calibrate` on another text) next to transformers' quantized caches.

    python benchmarks/quantized.py                 # full run (about 45 min on 2 free CPU cores)
    python benchmarks/quantized.py --max-tokens 1024 --token-tokens 256 --specs dynamic quantized:bits=4
"""

import argparse
import json
import math
import os
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import DynamicCache

from hf_kvcache.eval.data import load_text, tokenize_text
from hf_kvcache.eval.memory import cache_bytes
from hf_kvcache.eval.perplexity import decode_speed, evaluation_pass
from hf_kvcache.models import load_model
from hf_kvcache.registry import build_cache
from hf_kvcache.report import format_table

PROFILES = os.path.relpath(Path(__file__).parent / "results")  # calibrated on pg19, not on WikiText-2
DEFAULT_SPECS = [
    "dynamic",
    "quantized:bits=8",
    "quantized:bits=4",
    "quantized:bits=4,key_group_size=16",
    "quantized:bits=4,key_outliers=1",
    "quantized:bits=4,codebook=normal",
    "quantized:bits=3",
    "quantized:bits=3,key_group_size=16",
    "quantized:bits=3,key_outliers=1",
    "quantized:bits=3,codebook=normal",
    f"quantized:profile={PROFILES}/profile-3bits.json",
    "quantized:bits=2,key_bits=3",
    f"quantized:profile={PROFILES}/profile-2.5bits.json",
    f"quantized:profile={PROFILES}/profile-2.25bits.json",
    "quantized:bits=2",
    "quantized:bits=2,key_group_size=16",
    "quantized:bits=2,key_outliers=1",
    "quantized:bits=2,key_outliers=2",
    "quantized:bits=2,codebook=normal",
    "quantized:bits=2,key_group_size=16,group_size=64,residual_length=64",
    "quantized:bits=2,rotate=False",
    "quantized:bits=2,sink_tokens=0",
    "hf-quantized:backend=quanto,bits=4",
    "hf-quantized:backend=quanto,bits=2",
    "hf-quantized:backend=hqq,bits=4",
    "hf-quantized:backend=fp8",
]
# Token-by-token passes cost ~1000 forwards each: run them for the headline specs only.
TOKEN_MODE_SPECS = [
    "dynamic",
    "quantized:bits=4",
    "quantized:bits=3,key_group_size=16",
    f"quantized:profile={PROFILES}/profile-2.5bits.json",
    "quantized:bits=2",
    "quantized:bits=2,key_group_size=16,group_size=64,residual_length=64",
    "hf-quantized:backend=quanto,bits=4",
    "hf-quantized:backend=fp8",
]
CHUNK = 64
DECODE_STEPS = 16
# Our stores quantize whole key blocks once, so what they hold after n tokens does not depend on how the
# tokens came (checked: equal bytes for chunks of 64 and 1024); replaying in big chunks spares every
# step's dequantization of the whole cache. transformers' caches are replayed as the pass fed them.
OUR_REPLAY_CHUNK = 1024


def fp16_bytes(spec: str, config, dynamic: DynamicCache, length: int) -> int:
    """Bytes `spec` holds after `length` tokens of the fp32 run's KV, cast to fp16, replayed through it."""
    cache = build_cache(spec, config)
    chunk = CHUNK if spec.startswith("hf-") else OUR_REPLAY_CHUNK
    for start in range(0, length, chunk):
        for index, layer in enumerate(dynamic.layers):
            keys = layer.keys[:, :, start : start + chunk].half()
            values = layer.values[:, :, start : start + chunk].half()
            cache.update(keys, values, index)
    return cache_bytes(cache)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-tokens", type=int, default=4096, help="chunked-pass length (default 4096)")
    parser.add_argument("--token-tokens", type=int, default=1024, help="token-by-token pass length (default 1024)")
    parser.add_argument("--specs", nargs="+", default=DEFAULT_SPECS, help="cache specs (see hf-kvcache eval --help)")
    parser.add_argument("--token-specs", nargs="*", default=TOKEN_MODE_SPECS, help="specs run token by token")
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results", help="folder for results")
    args = parser.parse_args()

    torch.manual_seed(0)
    model, tokenizer = load_model()
    text = load_text("wikitext2")
    ids = tokenize_text(text, tokenizer, args.max_tokens)
    half = min(2048, args.max_tokens)
    rows = []
    for spec in tqdm(args.specs, desc="caches"):
        cache = build_cache(spec, model.config)
        chunked = evaluation_pass(model, ids, cache, step=CHUNK)
        decode_long = decode_speed(model, cache, chunked.last_logits, steps=DECODE_STEPS)
        # 1K context: token-by-token for the headline specs, chunks of 64 otherwise (same final cache).
        short = build_cache(spec, model.config)
        token_mode = spec in args.token_specs
        token = evaluation_pass(model, ids[:, : args.token_tokens], short, step=1 if token_mode else CHUNK)
        decode_short = decode_speed(model, short, token.last_logits, steps=DECODE_STEPS)
        if not rows:
            if spec != "dynamic":
                raise SystemExit("the first spec must be `dynamic`: it is the reference of every ratio")
            reference_kv = cache
        rows.append(
            {
                "cache": spec,
                f"ppl@{half} chunk": math.exp(chunked.nll[: half - 1].mean().item()),
                f"ppl@{args.max_tokens} chunk": chunked.perplexity,
                f"ppl@{args.token_tokens} token": token.perplexity if token_mode else float("nan"),
                "fp16 bytes": fp16_bytes(spec, model.config, reference_kv, args.max_tokens),
                "decode tok/s 1K": decode_short,
                "decode tok/s 4K": decode_long,
            }
        )
        tqdm.write(str(rows[-1]))
        args.output.mkdir(parents=True, exist_ok=True)  # rows so far, in case the run stops
        (args.output / "quantized.json").write_text(json.dumps({"data_source": text.source, "rows": rows}, indent=2))
    base = rows[0]
    for row in rows:
        for key in list(row):
            if key.startswith("ppl") or key in ("fp16 bytes", "decode tok/s 1K", "decode tok/s 4K"):
                row[f"{key} /dyn"] = row[key] / base[key]
    table = format_table(
        [{key: value for key, value in row.items() if "tok/s" not in key or "/dyn" in key} for row in rows]
    )
    print(f"model: packaged SmolLM2-135M-Instruct (fp32, CPU); data: WikiText-2 test ({text.source})")
    print(table)
    (args.output / "quantized.json").write_text(json.dumps({"data_source": text.source, "rows": rows}, indent=2))
    (args.output / "quantized.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
