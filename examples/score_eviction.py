"""Passkey retrieval under a small KV budget: full cache vs sliding window vs H2O vs TOVA vs SnapKV.

Each sample hides a random 5-digit pass key at a random depth of a few hundred tokens of repetitive
filler text, then asks for it. The prompt is prefilled in one forward through the cache and the
answer is decoded greedily; a sample counts as found when the key appears in the answer. The
bounded caches keep `--budget` tokens per layer (and KV head):

- DynamicCache keeps everything (the reference),
- SlidingWindowCache keeps the newest `--budget` tokens: it finds the key only when the key is recent,
- HeavyHitterCache (H2O) keeps the newest half of the budget plus the older tokens that received the
  most attention, summed over every query so far,
- TOVACache keeps the tokens the newest query attends to most (averaged over all heads of a layer),
- SnapKVCache keeps the prompt's last `--observation-window` tokens (here the question) plus the
  earlier tokens those queries attend to most; tokens generated afterwards are all kept.

The score-based caches need `hf_kvcache.enable_score_capture(model)`, which leaves outputs unchanged.

Every cache sees the same prompts (same `--seed`).

    python examples/score_eviction.py
    python examples/score_eviction.py --samples 2 --prompt-tokens 300 --budget 64
"""

import argparse
import random
import time

import torch
from transformers import DynamicCache

from hf_kvcache import CACHE_KWARG, HeavyHitterCache, SlidingWindowCache, SnapKVCache, TOVACache, enable_score_capture
from hf_kvcache.eval.memory import cache_bytes
from hf_kvcache.models import MODEL_HELP, load_model
from hf_kvcache.report import format_table

HEADER = "Somewhere in the long text below is a pass key. Remember it: you will be asked for it at the end.\n\n"
FILLER = "The river runs to the sea. The hills are quiet at night. Birds fly south in the autumn. "
QUESTION = "\n\nWhat is the pass key? The pass key is"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help=MODEL_HELP)
    parser.add_argument("--samples", type=int, default=6, help="prompts per cache (default: 6)")
    parser.add_argument("--prompt-tokens", type=int, default=640, help="approximate prompt length (default: 640)")
    parser.add_argument("--budget", type=int, default=128, help="tokens kept by the bounded caches (default: 128)")
    parser.add_argument("--observation-window", type=int, default=32, help="SnapKV's observation window (default: 32)")
    parser.add_argument("--max-new-tokens", type=int, default=8, help="answer tokens (default: 8)")
    parser.add_argument("--seed", type=int, default=0, help="seed of keys and depths (default: 0)")
    args = parser.parse_args()
    if args.samples < 1 or not 1 <= args.observation_window <= args.budget:
        parser.error("--samples must be >= 1 and --observation-window between 1 and --budget")
    return args


def passkey_prompt(rng: random.Random, tokenizer, prompt_tokens: int) -> tuple[torch.Tensor, str, float]:
    """Token ids of a prompt with a random key at a random depth; the key; the depth as a fraction."""
    key = f"{rng.randrange(10**4, 10**5)}"
    needle = f"The pass key is {key}. Remember {key}. "
    fixed = len(tokenizer(HEADER + needle + QUESTION).input_ids)
    repeats = max(1, (prompt_tokens - fixed) // len(tokenizer(FILLER).input_ids))
    before = rng.randint(0, repeats)
    text = HEADER + FILLER * before + needle + FILLER * (repeats - before) + QUESTION
    return tokenizer(text, return_tensors="pt").input_ids, key, before / repeats


@torch.no_grad()
def answer(model, tokenizer, input_ids: torch.Tensor, cache, max_new_tokens: int) -> str:
    output = model.generate(
        input_ids,
        attention_mask=torch.ones_like(input_ids),
        **{CACHE_KWARG: cache},
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.eos_token_id,
    )
    return " ".join(tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True).split())


def main() -> None:
    args = parse_args()
    model, tokenizer = load_model(args.model)
    enable_score_capture(model)  # H2O, TOVA and SnapKV read attention scores; outputs are unchanged
    caches = {
        "full": lambda: DynamicCache(config=model.config),
        "window": lambda: SlidingWindowCache(model.config, window=args.budget),
        "h2o": lambda: HeavyHitterCache(model.config, budget=args.budget),
        "tova": lambda: TOVACache(model.config, budget=args.budget),
        "snapkv": lambda: SnapKVCache(model.config, budget=args.budget, observation_window=args.observation_window),
    }
    rng = random.Random(args.seed)
    samples = [passkey_prompt(rng, tokenizer, args.prompt_tokens) for _ in range(args.samples)]

    found = dict.fromkeys(caches, 0)
    held = dict.fromkeys(caches, 0)
    seconds = dict.fromkeys(caches, 0.0)
    sample_rows = []
    for index, (input_ids, key, depth) in enumerate(samples):
        row = {"sample": index + 1, "tokens": input_ids.shape[1], "key depth": f"{depth:.0%}", "key": key}
        for name, make_cache in caches.items():
            cache = make_cache()
            started = time.perf_counter()
            text = answer(model, tokenizer, input_ids, cache, args.max_new_tokens)
            seconds[name] += time.perf_counter() - started
            held[name] += cache_bytes(cache)
            found[name] += key in text
            row[name] = ("found: " if key in text else "missed: ") + repr(text[:24])
        sample_rows.append(row)

    print(format_table(sample_rows), "\n")
    labels = {
        "full": "DynamicCache (full)",
        "window": f"SlidingWindowCache(window={args.budget})",
        "h2o": f"HeavyHitterCache(budget={args.budget})",
        "tova": f"TOVACache(budget={args.budget})",
        "snapkv": f"SnapKVCache(budget={args.budget}, observation_window={args.observation_window})",
    }
    rows = [
        {
            "cache": labels[name],
            "found": f"{found[name]}/{args.samples}",
            "accuracy": found[name] / args.samples,
            "mean cache bytes": held[name] // args.samples,
            "seconds": seconds[name],
        }
        for name in caches
    ]
    print(f"Passkey retrieval, {args.samples} prompts of about {args.prompt_tokens} tokens (seed {args.seed})")
    print(format_table(rows))


if __name__ == "__main__":
    main()
