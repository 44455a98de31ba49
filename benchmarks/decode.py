"""Decode speed of QuantizedCache reading codes vs dequantizing, as a ratio to DynamicCache in the same run.

For each context length (default 1K, 4K, 16K) and each cache spec, the cache is filled to that length
and then greedy single-token decode steps are timed on the packaged real model (SmolLM2-135M, fp32 on
CPU unless --device/--dtype say otherwise). The table shows tokens/s (1 / median step time over
--steps timed steps after --warmup untimed ones; the median resists other processes on a shared
machine) and the ratio to `DynamicCache` measured at the same length in the same run.

Filling a 16K cache by running the model over 16K tokens would take minutes on CPU (and SmolLM2 is
trained to 8K). Instead the model runs once over the first --fill tokens of WikiText-2 (a real prefill,
DynamicCache), and every cache is filled by passing that real KV to `cache.update` layer by layer, in
chunks of --fill tokens, repeated until the context length is reached (so a 16K cache holds the 1K
prefill's KV sixteen times, at its original RoPE positions). Decoding then continues from the
cache's length: attention runs over all stored tokens, which is what decode speed depends on; the
generated text is not meaningful beyond the first --fill tokens and is not looked at.

Specs (see `hf-kvcache eval --help` for the syntax): DynamicCache; hf_kvcache's QuantizedCache at 4 and 2
bits with `attention=codes` (compiled), `attention=codes,compile_attention=False` (eager) and
`attention=dequantize`; transformers' quanto-backed QuantizedCache at 4 and 2 bits when optimum-quanto is
installed.

On a shared machine, --threads 1 keeps other processes from stalling torch's thread barriers (with 2
threads and one core busy elsewhere, every small op can wait milliseconds); results/decode.json was
measured that way, the thread count is recorded in the JSON.

    python benchmarks/decode.py --threads 1 --steps 6 --warmup 4   # results/decode.json (~10 min)
    python benchmarks/decode.py --contexts 256 --fill 128 --steps 2 --warmup 2 --device cpu   # smoke test
    python benchmarks/decode.py --device cuda --dtype float16 --contexts 4096 32768 --output DIR
"""

import argparse
import importlib.util
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import DynamicCache

from hf_kvcache.eval.data import load_text, tokenize_text
from hf_kvcache.eval.memory import cache_bytes
from hf_kvcache.models import MODEL_HELP, load_model, model_title
from hf_kvcache.registry import build_cache
from hf_kvcache.report import format_table

OURS = [
    "quantized:bits=4,attention=codes",
    "quantized:bits=4,attention=codes,compile_attention=False",
    "quantized:bits=4,attention=dequantize",
    "quantized:bits=2,attention=codes",
    "quantized:bits=2,attention=codes,compile_attention=False",
    "quantized:bits=2,attention=dequantize",
]
QUANTO = ["hf-quantized:backend=quanto,bits=4", "hf-quantized:backend=quanto,bits=2"]


def default_specs() -> list[str]:
    quanto = importlib.util.find_spec("optimum") is not None and importlib.util.find_spec("optimum.quanto") is not None
    return ["dynamic", *OURS, *(QUANTO if quanto else [])]


@torch.no_grad()
def real_kv(model, tokenizer, fill: int) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """Per-layer (keys, values) of one prefill over the first `fill` WikiText-2 tokens, and its last logits."""
    ids = tokenize_text(load_text("wikitext2", use_hub=False), tokenizer, fill).to(model.device)
    dynamic = DynamicCache(config=model.config)
    logits = model(ids, cache=dynamic, use_cache=True).logits[:, -1]
    return [(layer.keys, layer.values) for layer in dynamic.layers], logits


@torch.no_grad()
def filled_cache(spec: str, config, kv: list[tuple[torch.Tensor, torch.Tensor]], length: int):
    """A new `spec` cache holding `length` tokens: the prefill's KV repeated, passed in chunks to `update`."""
    cache = build_cache(spec, config)
    chunk = kv[0][0].shape[-2]
    for start in range(0, length, chunk):
        count = min(chunk, length - start)
        for index, (keys, values) in enumerate(kv):
            cache.update(keys[:, :, :count], values[:, :, :count], index)
    return cache


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def decode_tokens_per_second(model, cache, logits: torch.Tensor, warmup: int, steps: int) -> float:
    """1 / median seconds of a greedy single-token decode step through `cache`, after `warmup` steps."""
    token = logits.argmax(-1, keepdim=True)
    seconds = []
    for index in range(warmup + steps):
        synchronize(model.device)
        began = time.perf_counter()
        logits = model(token, cache=cache, use_cache=True).logits[:, -1]
        synchronize(model.device)
        if index >= warmup:
            seconds.append(time.perf_counter() - began)
        token = logits.argmax(-1, keepdim=True)
    return 1.0 / statistics.median(seconds)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384], help="cache lengths")
    parser.add_argument("--fill", type=int, default=1024, help="tokens of the real prefill that fills the caches")
    parser.add_argument("--specs", nargs="+", default=None, help="cache specs (default: see the docstring)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed decode steps (compilation happens here)")
    parser.add_argument("--steps", type=int, default=8, help="timed decode steps")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--dtype", default="float32", help="model dtype: float32, float16, bfloat16")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--model", default=None, help=MODEL_HELP)
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results", help="folder for results")
    args = parser.parse_args(argv)
    specs = args.specs or default_specs()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device, attn_implementation="sdpa")
    kv, logits = real_kv(model, tokenizer, args.fill)
    rows = []
    for length in args.contexts:
        speeds = {}
        for spec in specs:
            cache = filled_cache(spec, model.config, kv, length)
            speeds[spec] = decode_tokens_per_second(model, cache, logits, args.warmup, args.steps)
            rows.append(
                {
                    "context": length,
                    "spec": spec,
                    "tokens_per_s": speeds[spec],
                    "ratio_to_dynamic": speeds[spec] / speeds["dynamic"] if "dynamic" in speeds else None,
                    "cache_mib": cache_bytes(cache) / 2**20,
                }
            )
            del cache
    result = {
        "model": model_title(args.model),
        "device": str(model.device),
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "fill": args.fill,
        "warmup": args.warmup,
        "steps": args.steps,
        "torch": torch.__version__,
        "rows": rows,
    }
    table = format_table(
        [
            {
                "context": row["context"],
                "cache": row["spec"],
                "tokens/s": round(row["tokens_per_s"], 2),
                "x dynamic": "" if row["ratio_to_dynamic"] is None else f"{row['ratio_to_dynamic']:.2f}",
                "cache MiB": round(row["cache_mib"], 1),
            }
            for row in rows
        ]
    )
    print(table)
    args.output.mkdir(parents=True, exist_ok=True)
    name = "decode" if model.device.type == "cpu" else f"decode-{model.device.type}-{args.dtype}"
    (args.output / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.output / f"{name}.md").write_text(table + "\n")
    return result


if __name__ == "__main__":
    main()
