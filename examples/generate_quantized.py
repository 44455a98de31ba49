"""Generate the same continuation through DynamicCache and QuantizedCache at 2, 4 and 8 bits.

The prompt is the start of the bundled WikiText-2 test text, several hundred tokens long so that
most of the context leaves the full-precision residual (the newest 128 tokens by default) and is
really held in low-bit codes. For every cache the script prints the generated text, then a table:
bytes the cache holds at the end, their ratio to DynamicCache, generation speed (new tokens per
second of `generate`, prefill included), and how many leading generated tokens match DynamicCache.

    python examples/generate_quantized.py
    python examples/generate_quantized.py --max-tokens 256 --max-new-tokens 16 --bits 4
"""

import argparse
import textwrap
import time

import torch
from transformers import DynamicCache

from hf_kvcache import CACHE_KWARG, QuantizedCache
from hf_kvcache.eval.data import load_text, tokenize_text
from hf_kvcache.eval.memory import cache_bytes
from hf_kvcache.models import MODEL_HELP, load_model, model_title
from hf_kvcache.report import format_table


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help=MODEL_HELP)
    parser.add_argument("--max-tokens", type=int, default=768, help="prompt tokens of WikiText-2 (default: 768)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default: 64)")
    parser.add_argument("--bits", type=int, nargs="+", default=[8, 4, 2], help="bit widths (default: 8 4 2)")
    return parser.parse_args()


def common_prefix(a: list[int], b: list[int]) -> int:
    """Number of leading tokens two generations share."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, cache, max_new_tokens: int, pad_token_id: int) -> tuple[list[int], float]:
    """Greedy generation through `cache`: the new token ids and the seconds `generate` took."""
    started = time.perf_counter()
    output = model.generate(
        input_ids,
        attention_mask=torch.ones_like(input_ids),
        **{CACHE_KWARG: cache},
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=pad_token_id,
    )
    return output[0, input_ids.shape[1] :].tolist(), time.perf_counter() - started


def main() -> None:
    args = parse_args()
    model, tokenizer = load_model(args.model)
    input_ids = tokenize_text(load_text("wikitext2", use_hub=False), tokenizer, args.max_tokens)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    generate(model, input_ids[:, :32], DynamicCache(config=model.config), 2, pad)  # warm-up

    caches = {"DynamicCache": lambda: DynamicCache(config=model.config)}
    for bits in args.bits:
        caches[f"QuantizedCache {bits}-bit"] = lambda bits=bits: QuantizedCache(model.config, bits=bits)

    print(f"Prompt: the first {input_ids.shape[1]} tokens of WikiText-2 (test), ending with:")
    print(textwrap.indent(textwrap.fill("..." + tokenizer.decode(input_ids[0, -40:]), 100), "    "), "\n")
    rows, reference = [], None
    for name, make_cache in caches.items():
        cache = make_cache()
        tokens, seconds = generate(model, input_ids, cache, args.max_new_tokens, pad)
        reference = reference or tokens
        print(f"--- {name} ---")
        print(textwrap.indent(textwrap.fill(tokenizer.decode(tokens, skip_special_tokens=True), 100), "    "), "\n")
        rows.append(
            {
                "cache": name,
                "prompt tokens": input_ids.shape[1],
                "new tokens": len(tokens),
                "cache bytes": cache_bytes(cache),
                "bytes x": 0.0,
                "tokens/s": len(tokens) / seconds,
                "same as dynamic": f"{common_prefix(tokens, reference)}/{len(tokens)}",
            }
        )
    for row in rows:
        row["bytes x"] = row["cache bytes"] / rows[0]["cache bytes"]
    print(f"{model_title(args.model)} ({model.dtype}), greedy decoding")
    print(format_table(rows))


if __name__ == "__main__":
    main()
