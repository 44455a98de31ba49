"""Needle retrieval and WikiText-2 perplexity for the eviction caches at a fixed token budget.

Retrieval (`--task`): a needle hidden at a random depth in about 1000 tokens of filler text, then
the question; the prompt goes through the cache in one forward (prefill), then greedy decoding.
A sample counts as found when the answer is in the first 8 generated tokens.
- `passkey`: a random 5-digit key (SmolLM2 reads it as five single-digit tokens);
- `treasure`: "Maria keeps her treasure in the <word> box in <city>": both the word and the city must come back.

Perplexity: the first `--ppl-tokens` tokens of WikiText-2 (test) fed in chunks of `--chunk` tokens,
each chunk seeing the cache plus its own keys; the budget is `--ppl-budget` of the evaluated tokens.

    flock /tmp/hf_kvcache_heavy.lock python benchmarks/retrieval.py --samples 50
"""

import argparse
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from hf_kvcache import CACHE_KWARG, enable_score_capture
from hf_kvcache.eval.data import bundled_text
from hf_kvcache.eval.perplexity import evaluation_pass
from hf_kvcache.models import load_model
from hf_kvcache.registry import build_cache, parse_cache_spec
from hf_kvcache.report import format_table

WORDS = [
    "apple",
    "river",
    "candle",
    "mountain",
    "violin",
    "garden",
    "pepper",
    "rocket",
    "silver",
    "lantern",
    "meadow",
    "pencil",
    "harbor",
    "tiger",
]
CITIES = [
    "Lisbon",
    "Nairobi",
    "Oslo",
    "Lima",
    "Hanoi",
    "Dublin",
    "Quito",
    "Tunis",
    "Riga",
    "Perth",
    "Accra",
    "Bergen",
    "Cusco",
    "Porto",
    "Split",
]


@dataclass(frozen=True)
class Task:
    """A retrieval task: the text around the needle, and how to draw a needle with its answers."""

    intro: str
    filler: str
    question: str
    needle: Callable[[random.Random], tuple[str, tuple[str, ...]]]  # needle text, strings the answer must hold


def passkey_needle(rng: random.Random) -> tuple[str, tuple[str, ...]]:
    key = str(rng.randint(10000, 99999))
    return f"The pass key is {key}. Remember it. {key} is the pass key. ", (key,)


def treasure_needle(rng: random.Random) -> tuple[str, tuple[str, ...]]:
    word, city = rng.choice(WORDS), rng.choice(CITIES)
    return f"Maria keeps her treasure in the {word} box in {city}. ", (word, city)


TASKS = {
    "passkey": Task(
        intro="There is an important piece of information hidden inside a lot of irrelevant text. "
        "Find it and memorize it. I will quiz you about it.\n",
        filler="The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ",
        question="\nWhat is the pass key? The pass key is",
        needle=passkey_needle,
    ),
    "treasure": Task(
        intro="Read the notes below. One of them tells where Maria keeps her treasure. Remember it.\n",
        filler="The train left the station on time. People read newspapers and looked out of the window. ",
        question="\nWhere does Maria keep her treasure? Maria keeps her treasure in",
        needle=treasure_needle,
    ),
}


def cache_specs(budget: int, templates: list[str] | None = None) -> list[str]:
    """Eval cache specs, each keeping `budget` tokens per layer (the first: the full cache).

    `templates` (from `--specs`) replace the default set: specs with `{budget}` in place of the budget.
    The score-based rows spell out `per_head` so that they mean the same whatever the defaults are.
    """
    templates = templates or [
        "sink:sink_tokens=4,window={window}",
        "window:window={budget}",
        "h2o:budget={budget},per_head=true",
        "h2o:budget={budget},per_head=true,accumulate=mean",
        "tova:budget={budget},per_head=false",
        "tova:budget={budget},per_head=true",
        "snapkv:budget={budget},per_head=true",
        "snapkv:budget={budget},per_head=false",
        "snapkv:budget={budget},per_head=true,kernel_size=15",
    ]
    return ["dynamic"] + [template.format(budget=budget, window=budget - 4) for template in templates]


def retrieval_sample(rng: random.Random, tokenizer, target_tokens: int, task: Task) -> tuple[torch.Tensor, tuple]:
    """Token ids of one prompt with its needle at a random depth, and the strings the answer must hold."""
    needle, answers = task.needle(rng)
    per_filler = len(tokenizer(task.filler).input_ids)
    fixed = len(tokenizer(task.intro + needle + task.question).input_ids)
    repeats = max(1, (target_tokens - fixed) // per_filler)
    depth = rng.randint(0, repeats)
    text = task.intro + task.filler * depth + needle + task.filler * (repeats - depth) + task.question
    return tokenizer(text, return_tensors="pt").input_ids, answers


@torch.no_grad()
def retrieval_accuracy(
    model, tokenizer, spec: str, samples: int, target_tokens: int, seed: int, task: Task = TASKS["passkey"]
) -> float:
    rng = random.Random(seed)  # the same prompts for every cache
    found = 0
    for _ in tqdm(range(samples), desc=spec, leave=False):
        ids, answers = retrieval_sample(rng, tokenizer, target_tokens, task)
        cache = build_cache(parse_cache_spec(spec), model.config)
        output = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            **{CACHE_KWARG: cache},
            max_new_tokens=8,
            do_sample=False,
            pad_token_id=tokenizer.eos_token_id,
        )
        answer = tokenizer.decode(output[0, ids.shape[1] :])
        found += all(part in answer for part in answers)
    return found / samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=sorted(TASKS), default="passkey", help="what is hidden (default: passkey)")
    parser.add_argument("--samples", type=int, default=50, help="retrieval prompts per cache and budget")
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
        help="cache specs instead of the default set, {budget} standing for the budget (and {window} for "
        "budget - 4), e.g. 'snapkv:budget={budget},kernel_size=15'",
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
        result[args.task] = retrieval_table(model, tokenizer, args)
    if not args.skip_ppl:
        result["perplexity"] = perplexity_table(model, tokenizer, args)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {args.output}")


def retrieval_table(model, tokenizer, args: argparse.Namespace) -> list[dict]:
    rows, full_done = [], args.skip_full
    for budget in args.budgets:
        for spec in cache_specs(budget, args.specs):
            if spec == "dynamic":
                if full_done:
                    continue  # the full cache does not depend on the budget
                full_done = True
            started = time.perf_counter()
            accuracy = retrieval_accuracy(
                model, tokenizer, spec, args.samples, args.prompt_tokens, args.seed, TASKS[args.task]
            )
            rows.append(
                {
                    "cache": spec,
                    "budget": "-" if spec == "dynamic" else budget,
                    "found": f"{round(accuracy * args.samples)}/{args.samples}",
                    "accuracy": f"{accuracy:.0%}",
                    "seconds": f"{time.perf_counter() - started:.0f}",
                }
            )
            print(rows[-1], flush=True)
    print(f"\n{args.task} retrieval, {args.samples} samples, ~{args.prompt_tokens}-token prompts (seed {args.seed})")
    print(format_table(rows))
    return rows


def perplexity_table(model, tokenizer, args: argparse.Namespace) -> list[dict]:
    text = args.text.read_text(encoding="utf-8") if args.text else bundled_text("wikitext2")
    ids = tokenizer(text[: args.ppl_tokens * 8], return_tensors="pt").input_ids[:, : args.ppl_tokens]
    budget = int(args.ppl_budget * ids.shape[1])
    rows = []
    for spec in cache_specs(budget, args.specs):
        started = time.perf_counter()
        with torch.no_grad():
            record = evaluation_pass(model, ids, build_cache(parse_cache_spec(spec), model.config), args.chunk)
        rows.append(
            {"cache": spec, "perplexity": f"{record.perplexity:.2f}", "seconds": f"{time.perf_counter() - started:.0f}"}
        )
        print(rows[-1], flush=True)
    print(f"\nWikiText-2 perplexity, {ids.shape[1]} tokens, chunks of {args.chunk}, budget {budget} tokens")
    print(format_table(rows))
    return rows


if __name__ == "__main__":
    main()
