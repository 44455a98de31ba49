"""Stream a text past the model's trained context through SinkCache: memory stays flat, perplexity sane.

The first `--max-tokens` tokens of the bundled book (Crime and Punishment, a PG-19-style text; by
default 10,240 tokens, past SmolLM2's 8,192-token trained context) are fed through three caches:

- DynamicCache: keeps every token (the reference; its memory grows with the text), fed in segments,
- SlidingWindowCache: the last `--window` tokens only,
- SinkCache: the first `--sink-tokens` tokens plus the last `--window - --sink-tokens` tokens.

The bounded caches take `--step` tokens per forward (64 by default, so the default run takes about
two minutes on two CPU cores; `--step 1` is the StreamingLLM token-by-token protocol, where each
token sees only the cache). Both hold the same number of tokens. For every segment of `--segment`
tokens the script prints the perplexity of each cache and the bytes each holds at the segment's end.

    python examples/stream_past_context.py
    python examples/stream_past_context.py --max-tokens 512 --window 64 --segment 128 --step 1
"""

import argparse
import math
import time

from transformers import DynamicCache

from hf_kvcache import SinkCache, SlidingWindowCache
from hf_kvcache.eval.data import load_text, tokenize_text
from hf_kvcache.eval.perplexity import PassRecord, evaluation_pass
from hf_kvcache.models import MODEL_HELP, load_model
from hf_kvcache.report import format_table


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help=MODEL_HELP)
    parser.add_argument("--dataset", default="pg19", help="pg19, wikitext2 or a .txt file (default: pg19)")
    parser.add_argument("--max-tokens", type=int, default=10240, help="tokens of text to stream (default: 10240)")
    parser.add_argument("--window", type=int, default=1024, help="tokens each bounded cache keeps (default: 1024)")
    parser.add_argument("--sink-tokens", type=int, default=4, help="SinkCache's initial tokens (default: 4)")
    parser.add_argument("--segment", type=int, default=1024, help="tokens per perplexity segment (default: 1024)")
    parser.add_argument(
        "--step", type=int, default=64, help="tokens per forward of the bounded caches (default: 64; 1: token by token)"
    )
    args = parser.parse_args()
    if not 0 <= args.sink_tokens < args.window:
        parser.error(f"--sink-tokens {args.sink_tokens} must be between 0 and --window {args.window} - 1")
    if args.segment < 1 or args.step < 1:
        parser.error("--segment and --step must be at least 1")
    return args


def bytes_at(record: PassRecord, position: int) -> int:
    """Bytes the cache held once `position` tokens had been fed (the last step at or before it)."""
    index = max(i for i, fed in enumerate(record.positions) if fed <= position)
    return record.bytes_held[index]


def main() -> None:
    args = parse_args()
    model, tokenizer = load_model(args.model)
    text = load_text(args.dataset, use_hub=False)
    input_ids = tokenize_text(text, tokenizer, args.max_tokens)
    length = input_ids.shape[1]

    caches = {
        # DynamicCache keeps every token, so chunks of a segment give exactly the token-by-token NLL.
        "dense": (lambda: DynamicCache(config=model.config), args.segment),
        "window": (lambda: SlidingWindowCache(model.config, window=args.window), args.step),
        "sink": (
            lambda: SinkCache(model.config, sink_tokens=args.sink_tokens, window=args.window - args.sink_tokens),
            args.step,
        ),
    }
    records, seconds = {}, {}
    for name, (make_cache, step) in caches.items():
        started = time.perf_counter()
        records[name] = evaluation_pass(model, input_ids, make_cache(), step)
        seconds[name] = time.perf_counter() - started

    rows = []
    for start in range(0, length - 1, args.segment):
        end = min(start + args.segment, length - 1)  # predicted tokens start + 1 .. end
        row = {"tokens": f"{start + 1}-{end}"}
        for name, record in records.items():
            row[f"{name} ppl"] = math.exp(record.nll[start:end].mean().item())
        for name, record in records.items():
            row[f"{name} MiB"] = bytes_at(record, end + 1) / 2**20
        rows.append(row)
    rows.append(
        {
            "tokens": "all",
            **{f"{name} ppl": record.perplexity for name, record in records.items()},
            **{f"{name} MiB": max(record.bytes_held) / 2**20 for name, record in records.items()},
        }
    )

    per_forward = "token by token" if args.step == 1 else f"{args.step} tokens per forward"
    print(f"{length:,} tokens of {text.dataset} ({text.source}), {per_forward} (dense: chunks of {args.segment})")
    print(
        f"window = SlidingWindowCache(window={args.window}); "
        f"sink = SinkCache(sink_tokens={args.sink_tokens}, window={args.window - args.sink_tokens})"
    )
    print("ppl: perplexity of the segment's tokens; MiB: cache bytes at the segment's end (all: the maximum)\n")
    print(format_table(rows))
    full = [b for p, b in zip(records["sink"].positions, records["sink"].bytes_held) if p >= args.window]
    if full:
        print(
            f"\nSinkCache bytes once its {args.window} tokens were full: min {min(full):,}, max {max(full):,} "
            f"(DynamicCache at the end: {records['dense'].bytes_held[-1]:,})"
        )
    print("seconds: " + ", ".join(f"{name} {value:.1f}" for name, value in seconds.items()))


if __name__ == "__main__":
    main()
