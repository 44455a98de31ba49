"""Calibrated per-layer bit profiles vs uniform widths at the same average bits, on the real model.

Perplexity on the first 2048 tokens of WikiText-2 test, fed in chunks of 64, and the bytes each cache
holds at the end (fp32 model on CPU), for every spec, in one run. The profiles come from
`hf-kvcache calibrate` (default text: pg19, not WikiText-2), e.g.

    OMP_NUM_THREADS=1 hf-kvcache calibrate --average-bits 2.5 --output benchmarks/results/profile-2.5bits.json
    hf-kvcache calibrate --reuse benchmarks/results/profile-2.5bits.json --average-bits 3 \\
        --output benchmarks/results/profile-3bits.json          # and 2.25; the -nll files: --metric nll
    OMP_NUM_THREADS=1 python benchmarks/bit_profile.py         # about 12 s per spec on one CPU core

Writes benchmarks/results/bit-profile.json. Measured (2048 tokens, ppl; DynamicCache 15.23): at 2.25 bits the
KL profile 15.62 (uniform 2 bits: 16.66); at 2.5 bits 15.42 vs 15.52 for keys 3 / values 2; at 3 bits 15.32
vs 15.37 for 3 bits (keys 4 / values 3, 3.5 bits: 15.30). Profiles chosen by ΔNLL instead: 16.36, 16.11 and
16.15, worse than uniform widths (their one-layer ΔNLL on 512 tokens is mostly noise).
"""

import argparse
import json
import time
from pathlib import Path

from hf_kvcache.eval.data import load_text, tokenize_text
from hf_kvcache.eval.perplexity import evaluation_pass
from hf_kvcache.models import load_model
from hf_kvcache.quant.profile import BitProfile
from hf_kvcache.registry import build_cache, parse_cache_spec
from hf_kvcache.report import format_table

RESULTS = Path(__file__).parent / "results"
DEFAULT_SPECS = [
    "dynamic",
    "quantized:bits=2",
    f"quantized:profile={RESULTS / 'profile-2.25bits.json'}",
    f"quantized:profile={RESULTS / 'profile-2.25bits-nll.json'}",
    "quantized:bits=2,key_bits=3",
    f"quantized:profile={RESULTS / 'profile-2.5bits.json'}",
    f"quantized:profile={RESULTS / 'profile-2.5bits-nll.json'}",
    "quantized:bits=3",
    f"quantized:profile={RESULTS / 'profile-3bits.json'}",
    f"quantized:profile={RESULTS / 'profile-3bits-nll.json'}",
    "quantized:bits=4,key_bits=2",
    "quantized:bits=3,key_bits=4",
]


def average_bits(spec: str) -> float | None:
    """The mean code width of a quantized spec: (key bits + value bits) / 2, or its profile's."""
    parsed = parse_cache_spec(spec)
    if parsed.name != "quantized":
        return None
    if "profile" in parsed.params:
        return BitProfile.load(parsed.params["profile"]).average_bits
    bits = parsed.params.get("bits", 4)
    return (bits + (parsed.params.get("key_bits") or bits)) / 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--specs", nargs="+", default=DEFAULT_SPECS)
    parser.add_argument("--max-tokens", type=int, default=2048)
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--output", type=Path, default=RESULTS / "bit-profile.json")
    args = parser.parse_args()
    specs = [spec for spec in args.specs if "profile=" not in spec or Path(spec.split("profile=")[1]).exists()]
    model, tokenizer = load_model()
    text = load_text("wikitext2")
    ids = tokenize_text(text, tokenizer, args.max_tokens)
    rows = []
    for spec in specs:
        began = time.perf_counter()
        record = evaluation_pass(model, ids, build_cache(spec, model.config), step=args.chunk)
        label = spec.replace(str(RESULTS) + "/", "")
        rows.append(
            {
                "cache": label,
                "average bits": average_bits(spec),
                f"ppl@{args.max_tokens}": record.perplexity,
                "KiB held": record.bytes_held[-1] / 1024,
                "seconds": time.perf_counter() - began,
            }
        )
        print(format_table(rows[-1:]), flush=True)
    print(format_table(rows))
    settings = {"dataset": f"wikitext2 ({text.source})", "max_tokens": args.max_tokens, "chunk": args.chunk}
    args.output.write_text(json.dumps({"settings": settings, "results": rows}, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
