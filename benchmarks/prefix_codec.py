"""Prefix-store block formats on a real model: bytes per token, restore time, and the quality of generating after
a restore, for full-precision blocks, 8/4/2-bit KIVI blocks and the transform codec at several budgets.

The prefix is the first `--prefix-tokens` tokens of the bundled WikiText-2 test text, the continuation the next
`--continuation-tokens`. Per format: the prefix's KV (computed once) is saved to a memory store and restored into a
`DynamicCache`; then the continuation is scored through it. Reported: bytes per stored token and their ratio to the
same KV in fp16 (2 bytes per element: what the target "0.10x fp16" counts), the time of the first save (encoding
and writing every block), the median time of `PrefixCache.restore` (fetch, checks, decoding) against recomputing
the prefix with the model, the continuation's
perplexity and its change from the exact prefix's, and the largest logit error of the first continuation token.

The codec is calibrated on another text than the one measured (`--calibration-text`, default pg19: Crime and
Punishment when the hub is unreachable), or read from `--calibration`. Results: a printed table, `results.json`
and `bytes_vs_perplexity.png` in `--output`.

    flock /tmp/hf_kvcache_heavy.lock python benchmarks/prefix_codec.py
    python benchmarks/prefix_codec.py --budgets 1 2 --bits 4 --prefix-tokens 1024
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import DynamicCache

from hf_kvcache.calibration.transform_codec import calibrate_transform_codec
from hf_kvcache.compat import CACHE_KWARG
from hf_kvcache.eval.data import bundled_text, load_text, tokenize_text
from hf_kvcache.geometry import model_geometry
from hf_kvcache.models import MODEL_HELP, load_model, model_title
from hf_kvcache.prefix import CodecCalibration, MemoryBackend, PrefixCache, TransformCodec
from hf_kvcache.report import format_table


def median_seconds(run, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        run()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


@torch.no_grad()
def continuation_scores(model, cache, continuation: torch.Tensor) -> tuple[float, torch.Tensor]:
    """(perplexity of `continuation` after what `cache` holds, its logits [tokens, vocabulary])."""
    logits = model(continuation, **{CACHE_KWARG: cache}).logits[0].float()
    return float(torch.nn.functional.cross_entropy(logits[:-1], continuation[0, 1:]).exp()), logits


def stores(args, model, calibration: CodecCalibration) -> dict[str, PrefixCache]:
    """Every format measured, by name, each over its own memory backend."""
    made = {"full precision": PrefixCache(MemoryBackend(max_bytes=None), args.block_size)}
    for bits in args.bits:
        made[f"{bits}-bit KIVI"] = PrefixCache(MemoryBackend(max_bytes=None), args.block_size, bits=bits)
    for budget in args.budgets:
        codec = TransformCodec(calibration, model, average_bits=budget)
        made[f"codec {budget:g} bits"] = PrefixCache(MemoryBackend(max_bytes=None), args.block_size, codec=codec)
    return made


def plot(rows: list[dict], exact: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    for marker, prefix in (("o", "codec"), ("s", "KIVI"), ("^", "full")):
        chosen = [row for row in rows if prefix in row["format"]]
        axes.plot([r["x fp16"] for r in chosen], [r["perplexity"] for r in chosen], marker, label=prefix)
        for row in chosen:
            axes.annotate(row["format"].replace(" KIVI", "").replace("codec ", ""), (row["x fp16"], row["perplexity"]))
    axes.axhline(exact, color="gray", linestyle="--", label=f"exact prefix ({exact:.2f})")
    axes.axhline(exact * 1.01, color="gray", linestyle=":", label="+1%")
    axes.set(xscale="log", xlabel="bytes stored / fp16 bytes of the same KV", ylabel="continuation perplexity")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


@torch.no_grad()
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[1:]),
    )
    parser.add_argument("--model", default=None, help=MODEL_HELP)
    parser.add_argument("--prefix-tokens", type=int, default=2048)
    parser.add_argument("--continuation-tokens", type=int, default=256)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--bits", type=int, nargs="*", default=[8, 4, 2], help="KIVI widths to measure")
    parser.add_argument("--budgets", type=float, nargs="*", default=[0.5, 1, 1.5, 2, 3], help="codec bits per element")
    parser.add_argument("--calibration", type=Path, default=None, help="a codec calibration file (default: calibrate)")
    parser.add_argument("--calibration-text", default="pg19", help="text to calibrate on (default: pg19)")
    parser.add_argument("--calibration-tokens", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5, help="timed restores (and recomputations) per format")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/prefix-codec"))
    args = parser.parse_args(argv)

    model, tokenizer = load_model(args.model)
    args.output.mkdir(parents=True, exist_ok=True)
    if args.calibration is not None:
        calibration = CodecCalibration.load(args.calibration)
    else:
        text = load_text(args.calibration_text)
        ids = tokenize_text(text, tokenizer, args.calibration_tokens, option="--calibration-tokens")
        calibration = calibrate_transform_codec(model, ids, source=f"{text.dataset} ({text.source})")
        calibration.save(args.output / "calibration.safetensors")
    ids = tokenizer(bundled_text("wikitext2")[:400_000], return_tensors="pt").input_ids
    prefix = ids[:, : args.prefix_tokens]
    continuation = ids[:, args.prefix_tokens : args.prefix_tokens + args.continuation_tokens]

    exact_cache = DynamicCache()  # no config: every layer keeps every token of the prefix
    recompute = median_seconds(lambda: model(prefix, **{CACHE_KWARG: DynamicCache(config=model.config)}), args.repeats)
    model(prefix, **{CACHE_KWARG: exact_cache})
    layers = [(layer.keys, layer.values) for layer in exact_cache.layers]
    exact_cache = DynamicCache(config=model.config)
    model(prefix, **{CACHE_KWARG: exact_cache})
    exact, exact_logits = continuation_scores(model, exact_cache, continuation)
    fp16_bytes_per_token = 2 * sum(
        heads * (keys + values) for heads, keys, values in model_geometry(model.config).cached_kv_sizes
    )

    rows = []
    for name, store in stores(args, model, calibration).items():
        save = median_seconds(lambda store=store: store.save(model, prefix, layers), 1)  # the first save writes
        saved = store.stats()
        restored_tokens = len(prefix[0]) // args.block_size * args.block_size
        restore = median_seconds(
            lambda store=store: store.restore(model, prefix, DynamicCache(config=model.config)), args.repeats
        )
        cache = DynamicCache(config=model.config)
        assert store.restore(model, prefix, cache) == restored_tokens
        if restored_tokens < prefix.shape[1]:  # the prompt's last partial block is computed, as generate would
            model(prefix[:, restored_tokens:], **{CACHE_KWARG: cache})
        perplexity, logits = continuation_scores(model, cache, continuation)
        per_token = saved["bytes_stored"] / restored_tokens
        rows.append(
            {
                "format": name,
                "bytes/token": round(per_token, 1),
                "x fp16": round(per_token / fp16_bytes_per_token, 4),
                "save ms": round(1000 * save, 1),
                "restore ms": round(1000 * restore, 1),
                "x recompute": round(restore / recompute, 3),
                "perplexity": round(perplexity, 3),
                "change": f"{perplexity / exact - 1:+.2%}",
                "first-token max |dlogit|": round(float((logits[0] - exact_logits[0]).abs().max()), 4),
            }
        )
        print(format_table(rows[-1:]), file=sys.stderr)
    print(format_table(rows))
    print(
        f"exact prefix: perplexity {exact:.3f}; recomputing the {prefix.shape[1]}-token prefix: {1000 * recompute:.0f} "
        f"ms; fp16 KV: {fp16_bytes_per_token} bytes per token; codec calibrated on {calibration.tokens:,} tokens of "
        f"{calibration.source}"
    )
    result = {
        "model": model_title(args.model),
        "command": "python benchmarks/prefix_codec.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "threads": torch.get_num_threads(),
        "exact_perplexity": exact,
        "recompute_ms": 1000 * recompute,
        "fp16_bytes_per_token": fp16_bytes_per_token,
        "calibration": {"source": calibration.source, "tokens": calibration.tokens},
        "rows": rows,
    }
    (args.output / "results.json").write_text(json.dumps(result, indent=2))
    plot(rows, exact, args.output / "bytes_vs_perplexity.png")
    print(f"wrote {args.output / 'results.json'}, {args.output / 'bytes_vs_perplexity.png'}")
    return result


if __name__ == "__main__":
    main()
