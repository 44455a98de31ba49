"""Passkey retrieval and WikiText-2 perplexity for the eviction caches at a fixed token budget.

Passkey: a random 5-digit key hidden at a random depth in about 1000 tokens of filler text, then
the question; the prompt goes through the cache in one forward (prefill), then greedy decoding.
A sample counts as found when the key appears in the first 8 generated tokens.

Perplexity: the first `--ppl-tokens` tokens of WikiText-2 (test) fed in chunks of `--chunk` tokens,
each chunk seeing the cache plus its own keys; the budget is `--ppl-budget` of the evaluated tokens.

    flock /tmp/hf_kvcache_heavy.lock python benchmarks/retrieval.py --samples 50
"""

import argparse
import json
import random
import time
from pathlib import Path

import torch
from tqdm import tqdm

from hf_kvcache import enable_score_capture
from hf_kvcache.eval.data import bundled_text
from hf_kvcache.eval.perplexity import evaluation_pass
from hf_kvcache.models import load_model
from hf_kvcache.registry import build_cache, parse_cache_spec
from hf_kvcache.report import format_table

INTRO = (
    "There is an important piece of information hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about it.\n"
)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
QUESTION = "\nWhat is the pass key? The pass key is"


def cache_specs(budget: int, templates: list[str] | None = None) -> dict[str, str]:
    """Display name -> eval cache spec, each keeping `budget` tokens per layer (the first: the full cache).

    `templates` (from `--specs`) replace the default set: specs with `{budget}` in place of the budget.
    """
    if templates:
        return {"full (DynamicCache)": "dynamic"} | {
            t.format(budget=budget): t.format(budget=budget) for t in templates
        }
    return {
        "full (DynamicCache)": "dynamic",
        f"SinkCache 4+{budget - 4}": f"sink:sink_tokens=4,window={budget - 4}",
        f"SlidingWindowCache {budget}": f"window:window={budget}",
        f"H2O {budget} (recent 32)": f"h2o:budget={budget},recent=32",
        f"TOVA {budget}": f"tova:budget={budget}",
        f"SnapKV {budget} (window 32)": f"snapkv:budget={budget},observation_window=32",
    }


def passkey_sample(rng: random.Random, tokenizer, target_tokens: int) -> tuple[torch.Tensor, str]:
    """Token ids of one prompt with its key at a random depth, and the key."""
    key = str(rng.randint(10000, 99999))
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    per_filler = len(tokenizer(FILLER).input_ids)
    fixed = len(tokenizer(INTRO + needle + QUESTION).input_ids)
    repeats = max(1, (target_tokens - fixed) // per_filler)
    depth = rng.randint(0, repeats)
    text = INTRO + FILLER * depth + needle + FILLER * (repeats - depth) + QUESTION
    return tokenizer(text, return_tensors="pt").input_ids, key


@torch.no_grad()
def passkey_accuracy(model, tokenizer, spec: str, samples: int, target_tokens: int, seed: int) -> float:
    rng = random.Random(seed)  # the same prompts for every cache
    found = 0
    for _ in tqdm(range(samples), desc=spec, leave=False):
        ids, key = passkey_sample(rng, tokenizer, target_tokens)
        cache = build_cache(parse_cache_spec(spec), model.config)
        output = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            past_key_values=cache,
            max_new_tokens=8,
            do_sample=False,
            pad_token_id=tokenizer.eos_token_id,
        )
        found += key in tokenizer.decode(output[0, ids.shape[1] :])
    return found / samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=50, help="passkey prompts per cache and budget")
    parser.add_argument("--budgets", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--prompt-tokens", type=int, default=1000)
    parser.add_argument("--ppl-tokens", type=int, default=4096)
    parser.add_argument("--ppl-budget", type=float, default=0.2, help="fraction of --ppl-tokens kept")
    parser.add_argument("--chunk", type=int, default=16, help="tokens per forward in the perplexity run")
    parser.add_argument("--text", type=Path, default=None, help="a plain-text file (default: bundled WikiText-2 test)")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/retrieval.json"))
    parser.add_argument(
        "--specs",
        nargs="+",
        default=None,
        help="cache specs instead of the default set, {budget} standing for the budget, "
        "e.g. 'snapkv:budget={budget},kernel_size=15'",
    )
    parser.add_argument("--skip-ppl", action="store_true")
    parser.add_argument("--skip-retrieval", action="store_true")
    parser.add_argument("--skip-full", action="store_true", help="leave out the full-cache retrieval row")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    model, tokenizer = load_model()
    enable_score_capture(model)
    torch.manual_seed(args.seed)

    result = {"model": "SmolLM2-135M-Instruct (fp32, CPU)", "settings": vars(args) | {"output": str(args.output)}}
    if not args.skip_retrieval:
        result["passkey"] = retrieval_table(model, tokenizer, args)
    if not args.skip_ppl:
        result["perplexity"] = perplexity_table(model, tokenizer, args)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {args.output}")


def retrieval_table(model, tokenizer, args: argparse.Namespace) -> list[dict]:
    rows, full_accuracy = [], "skipped" if args.skip_full else None
    for budget in args.budgets:
        for name, spec in cache_specs(budget, args.specs).items():
            if name.startswith("full") and full_accuracy is not None:
                continue  # the full cache does not depend on the budget
            started = time.perf_counter()
            accuracy = passkey_accuracy(model, tokenizer, spec, args.samples, args.prompt_tokens, args.seed)
            if name.startswith("full"):
                full_accuracy = accuracy
            rows.append(
                {
                    "cache": name,
                    "budget": "-" if name.startswith("full") else budget,
                    "found": f"{round(accuracy * args.samples)}/{args.samples}",
                    "passkey accuracy": f"{accuracy:.0%}",
                    "seconds": f"{time.perf_counter() - started:.0f}",
                }
            )
            print(rows[-1], flush=True)
    print(f"\nPasskey retrieval, {args.samples} samples, ~{args.prompt_tokens}-token prompts (seed {args.seed})")
    print(format_table(rows))
    return rows


def perplexity_table(model, tokenizer, args: argparse.Namespace) -> list[dict]:
    text = args.text.read_text(encoding="utf-8") if args.text else bundled_text("wikitext2")
    ids = tokenizer(text[: args.ppl_tokens * 8], return_tensors="pt").input_ids[:, : args.ppl_tokens]
    budget = int(args.ppl_budget * ids.shape[1])
    rows = []
    for name, spec in cache_specs(budget, args.specs).items():
        started = time.perf_counter()
        with torch.no_grad():
            record = evaluation_pass(model, ids, build_cache(parse_cache_spec(spec), model.config), args.chunk)
        rows.append(
            {"cache": name, "perplexity": f"{record.perplexity:.2f}", "seconds": f"{time.perf_counter() - started:.0f}"}
        )
        print(rows[-1], flush=True)
    print(f"\nWikiText-2 perplexity, {ids.shape[1]} tokens, chunks of {args.chunk}, budget {budget} tokens")
    print(format_table(rows))
    return rows


if __name__ == "__main__":
    main()
