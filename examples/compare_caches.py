"""Compare cache strategies with the evaluation API: perplexity, cache memory and speed, plus plots.

`hf_kvcache.eval.evaluate` feeds the same WikiText-2 tokens (the bundled copy) through every cache
spec, in chunks of `--chunk-size` tokens, and measures perplexity, the bytes each cache holds, peak
process memory and prefill/decode tokens/s, with ratios to the first spec. The script prints the
table and writes results.json, results.csv, log_perplexity.png and cache_memory.png to `--output`.

Cache specs are registry strings (`name:key=value,...`); see `hf-kvcache eval --help` for the list.
The bounded caches in the default set keep 256 tokens, a quarter of the default 1024.

    python examples/compare_caches.py
    python examples/compare_caches.py --cache dynamic --cache quantized:bits=2 --max-tokens 256
"""

import argparse
from pathlib import Path

from hf_kvcache.eval import evaluate
from hf_kvcache.eval.plots import write_plots
from hf_kvcache.models import MODEL_HELP

DEFAULT_SPECS = [
    "dynamic",
    "quantized:bits=4",
    "quantized:bits=2",
    "window:window=256",
    "sink:sink_tokens=4,window=252",
    "h2o:budget=256,recent=32",
]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--cache",
        action="append",
        dest="caches",
        help="a cache spec; repeat for several (default: " + ", ".join(DEFAULT_SPECS) + ")",
    )
    parser.add_argument("--model", default=None, help=MODEL_HELP)
    parser.add_argument("--max-tokens", type=int, default=1024, help="tokens of WikiText-2 to evaluate (default: 1024)")
    parser.add_argument("--chunk-size", type=int, default=64, help="tokens per forward (default: 64)")
    parser.add_argument("--decode-tokens", type=int, default=16, help="decode steps timed per cache (default: 16)")
    parser.add_argument(
        "--output", type=Path, default=Path("compare_caches_output"), help="folder for results and plots"
    )
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    results = evaluate(
        caches=args.caches or DEFAULT_SPECS,
        model=args.model,
        dataset="wikitext2",
        use_hub=False,
        max_tokens=args.max_tokens,
        chunk_size=args.chunk_size,
        decode_tokens=args.decode_tokens,
        progress=False,
    )
    print(results.table())
    args.output.mkdir(parents=True, exist_ok=True)
    results.write_json(args.output / "results.json")
    results.write_csv(args.output / "results.csv")
    written = [args.output / "results.json", args.output / "results.csv", *write_plots(results, args.output)]
    print("\nwrote " + ", ".join(str(path) for path in written))


if __name__ == "__main__":
    main()
