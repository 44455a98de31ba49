"""`hf-kvcache demo`: generate with QuantizedCache next to DynamicCache and compare bytes held."""

import argparse
import time

import torch
from transformers import DynamicCache

from hf_kvcache.caches.quantized import QuantizedCache
from hf_kvcache.compat import CACHE_KWARG
from hf_kvcache.models import MODEL_HELP, load_model
from hf_kvcache.report import format_table

DEFAULT_PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def dynamic_cache_bytes(cache: DynamicCache) -> int:
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers if layer.is_initialized)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="generate with QuantizedCache and DynamicCache, print text, bytes held and speed",
        description="Generate the same continuation through DynamicCache and QuantizedCache at 2, 4 and 8 "
        "bits, and print the text, the bytes each cache holds and decode speed.\n"
        "example: hf-kvcache demo --max-new-tokens 64",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", default=None, help=MODEL_HELP)
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="prompt text (default: a short story request)")
    parser.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate (default: 200)")
    parser.add_argument("--bits", type=int, nargs="+", default=[8, 4, 2], help="bit widths (default: 8 4 2)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    model, tokenizer = load_model(args.model)
    messages = [{"role": "user", "content": args.prompt}]
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        text = args.prompt
    inputs = tokenizer(text, return_tensors="pt")
    prompt_length = inputs.input_ids.shape[1]
    caches = {"dynamic": DynamicCache(config=model.config)}
    caches.update({f"quantized {bits}-bit": QuantizedCache(model.config, bits=bits) for bits in args.bits})
    rows = []
    for name, cache in caches.items():
        start = time.perf_counter()
        with torch.no_grad():
            output = model.generate(
                **inputs, max_new_tokens=args.max_new_tokens, do_sample=False, **{CACHE_KWARG: cache}
            )
        seconds = time.perf_counter() - start
        new_tokens = output.shape[1] - prompt_length
        held = dynamic_cache_bytes(cache) if name == "dynamic" else cache.memory_bytes()
        completion = tokenizer.decode(output[0, prompt_length:], skip_special_tokens=True)
        print(f"--- {name} ---\n{completion.strip()}\n")
        rows.append(
            {"cache": name, "tokens": prompt_length + new_tokens, "bytes held": held, "tokens/s": new_tokens / seconds}
        )
    base = rows[0]["bytes held"]
    for row in rows:
        row["bytes vs dynamic"] = row["bytes held"] / base
    print(format_table(rows))
