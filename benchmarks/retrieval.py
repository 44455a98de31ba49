"""Eviction policies at a fixed token budget: passkey retrieval in a novel, bytes held, WikiText-2 perplexity.

Retrieval: the `passkey` task of `hf_kvcache.eval.tasks` (`--task` picks another of its tasks): a 5-digit
pass key hidden at a seeded random depth in a passage of the bundled *Crime and Punishment*, then the
question; `--prompt-tokens` counts context and question (the chat template adds a few dozen tokens). The
same prompts go to every cache. The prompt is split into its context (instructions and haystack) and its
question (question, end of the chat turn, answer prefix):

- a cache with a `compress_context(model, context_ids)` method ("compress once, reuse": KVzip-style,
  query-agnostic) gets the context through that method first (with `tokenizer=` when it takes one), then
  the question is fed; of the eviction caches, only those whose policy compresses once (KVzip; see
  `compresses_once`);
- every other cache gets context and question in one prefill.

Then `--new-tokens` tokens are decoded greedily and scored with `tasks.score` (the key among them).
The bytes each cache holds after the prompt (`hf_kvcache.eval.memory.cache_bytes`) are averaged over samples.

Perplexity: the first `--ppl-tokens` tokens of WikiText-2 (test) fed in chunks of `--chunk` tokens,
each chunk seeing the cache plus its own keys (a compress-once cache is compressed after each chunk); the
budget is `--ppl-budget` of the evaluated tokens. Score capture is on only while a cache that needs it runs.

Specs are templates with `{budget}` (and `{window}` = budget - 4, for the sink cache); `dynamic` (the full
cache) always runs first. A default spec whose cache name is not registered (a policy not yet added) is
skipped with one printed line. Results: printed tables and `--output` (JSON, with the command line).

    flock /tmp/hf_kvcache_heavy.lock python benchmarks/retrieval.py              # 50 samples, ~45 min
    flock /tmp/hf_kvcache_heavy.lock python benchmarks/retrieval.py --quick      # smoke run, < 1 min
"""

import argparse
import importlib
import inspect
import json
import pkgutil
import shlex
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import torch

import hf_kvcache
from hf_kvcache import CACHE_KWARG, score_capture
from hf_kvcache.eval.data import bundled_text
from hf_kvcache.eval.memory import cache_bytes
from hf_kvcache.eval.perplexity import evaluation_pass
from hf_kvcache.eval.tasks import TASKS, Sample, generate_samples, score
from hf_kvcache.models import MODEL_HELP, load_model
from hf_kvcache.registry import build_cache, parse_cache_spec, registered_caches
from hf_kvcache.report import format_table

DEFAULT_MODEL = "SmolLM2-135M-Instruct (fp32, CPU)"
FULL = "dynamic"
MIB = 2**20
# Default spec templates after `dynamic`; the score-based rows spell out `per_head` so that they mean the
# same whatever the defaults are. The last six are the policies of issue 16 (skipped until registered).
DEFAULT_TEMPLATES = (
    "window:window={budget}",
    "sink:sink_tokens=4,window={window}",
    "h2o:budget={budget},per_head=true",
    "h2o:budget={budget},per_head=true,accumulate=mean",
    "tova:budget={budget},per_head=false",
    "tova:budget={budget},per_head=true",
    "snapkv:budget={budget},per_head=true",
    "snapkv:budget={budget},per_head=false",
    "snapkv:budget={budget},per_head=true,kernel_size=15",
    "knorm:budget={budget}",
    "streaming-llm:sink_tokens=4,budget={budget}",
    "expected-attention:budget={budget}",
    "pyramidkv:budget={budget}",
    "adakv:budget={budget}",
    "kvzip:budget={budget}",
)
# Settings: (default, --quick default). An explicit flag wins over both.
DEFAULTS = {
    "samples": (50, 2),
    "budgets": ([128, 256], [128]),
    "prompt_tokens": (800, 400),
    "ppl_tokens": (4096, 256),
    "output": (Path("benchmarks/results/retrieval.json"), Path(tempfile.gettempdir()) / "retrieval-quick.json"),
}
POLICY_PACKAGES = ("hf_kvcache.caches", "hf_kvcache.policies")


# --- specs ------------------------------------------------------------------------------------------------
def load_policies(packages: Sequence[str] = POLICY_PACKAGES) -> None:
    """Import every module of the cache packages, so that each strategy registers itself. A package or
    module that is missing or fails to import (a policy still being written) is reported in one line."""
    for package in packages:
        try:
            module = importlib.import_module(package)
        except ModuleNotFoundError:
            continue
        for info in pkgutil.iter_modules(module.__path__, package + "."):
            try:
                importlib.import_module(info.name)
            except Exception as error:  # one broken module must not keep the others out
                print(f"skipping module {info.name}: {type(error).__name__}: {error}", flush=True)


def spec_name(template: str) -> str:
    return template.partition(":")[0].strip()


def one_per_cache(templates: Sequence[str]) -> list[str]:
    """The first template of each cache name (the `--quick` set: every policy once)."""
    firsts: dict[str, str] = {}
    for template in templates:
        firsts.setdefault(spec_name(template), template)
    return list(firsts.values())


def available_templates(templates: Sequence[str], explicit: bool) -> list[str]:
    """`dynamic` first, then `templates` whose cache is registered; each other name is reported in one line.

    The kept templates are checked against the registry now (with a stand-in budget), so that a wrong
    parameter fails before any model runs. With `explicit` (the user's `--specs`) an unknown name is an error.
    """
    registered = registered_caches()
    kept, skipped = [FULL], []
    for template in templates:
        name = spec_name(template)
        if name not in registered:
            if explicit:
                raise SystemExit(f"--specs {template!r}: no cache {name!r} registered; known: {', '.join(registered)}")
            if name not in skipped:
                skipped.append(name)
                print(f"skipping {name}: not registered", flush=True)
            continue
        parse_cache_spec(format_spec(template, 128))
        if template not in kept:
            kept.append(template)
    return kept


def check_buildable(config, templates: Sequence[str], budgets: Sequence[int]) -> None:
    """Build every spec at every budget once (no forward), so that a setting a cache refuses at some budget
    (e.g. a window longer than the budget) stops the run before the first hour, not in the middle of it."""
    for template in templates:
        for budget in budgets:
            try:
                build_cache(format_spec(template, budget), config)
            except ValueError as error:
                raise SystemExit(f"{format_spec(template, budget)}: {error}") from None


def format_spec(template: str, budget: int) -> str:
    return template.format(budget=budget, window=budget - 4)


def row_label(template: str) -> str:
    """A template as a row label: the budget written as B."""
    return template.replace("{budget}", "B").replace("{window}", "B-4")


# --- retrieval --------------------------------------------------------------------------------------------
def prompt_parts(tokenizer, sample: Sample) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (1, n) of the sample's context and (1, m) of its question, which follow each other.

    Together they are `hf_kvcache.eval.task_eval.prompt_ids`: with a chat template, the prompt as a user turn
    and the answer prefix after the generation prompt; without one, `sample.text` as raw text. The prompt is
    tokenized whole and cut before the first token that reaches into the question (BPE merges across the
    cut, e.g. of the blank line before the question, would differ if the parts were tokenized apart). The
    question part holds the question, the end of the turn and the answer prefix.
    """
    if not sample.question:
        raise ValueError(f"sample {sample.index} of task {sample.task!r} has no question to split off")
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": sample.prompt}], tokenize=False, add_generation_prompt=True
        )
        text, special = text + sample.answer_prefix, False
    else:
        text, special = sample.text, True
    cut = text.rfind(sample.question)
    if cut < 0:
        raise ValueError(f"the question of sample {sample.index} is not in its prompt text")
    if tokenizer.is_fast:
        encoded = tokenizer(text, add_special_tokens=special, return_offsets_mapping=True)
        ids, ends = encoded["input_ids"], [end for _, end in encoded["offset_mapping"]]
        split = next((index for index, end in enumerate(ends) if end > cut), len(ids))
        context, question = ids[:split], ids[split:]
    else:  # no offsets: the parts tokenized apart
        context = tokenizer(text[:cut], add_special_tokens=special)["input_ids"]
        question = tokenizer(text[cut:], add_special_tokens=False)["input_ids"]
    return torch.tensor([context], dtype=torch.long), torch.tensor([question], dtype=torch.long)


def compresses_once(cache) -> bool:
    """Whether `cache` takes the context through `compress_context` before the question: a cache that says so
    (`compresses_once`, as the eviction caches do from their policy's protocol: KVzip yes, SnapKV's
    observation window and the others no, measured as they are used, with the question in the prefill), or
    any other cache offering `compress_context`."""
    if not callable(getattr(cache, "compress_context", None)):
        return False
    return bool(getattr(cache, "compresses_once", True))


def _forward(model, ids: torch.Tensor, cache, start: int) -> torch.Tensor:
    """Logits of the last position after feeding `ids` at positions start.. through `cache`."""
    positions = torch.arange(start, start + ids.shape[1], device=model.device)[None]
    output = model(ids.to(model.device), **{CACHE_KWARG: cache}, position_ids=positions, use_cache=True)
    return output.logits[:, -1]


@torch.no_grad()
def answer_sample(
    model, tokenizer, spec: str, context_ids: torch.Tensor, question_ids: torch.Tensor, new_tokens: int
) -> dict:
    """One sample through a fresh cache of `spec`: the prompt (compressed once or prefilled), then greedy decoding.

    Returns `generated` (text), `cache_bytes` (held after the prompt), `compressed_once` and `seconds`.
    """
    cache = build_cache(spec, model.config)
    started = time.perf_counter()
    once = compresses_once(cache)
    with score_capture(model, getattr(cache, "needs_score_capture", False)):
        if once:
            accepts = inspect.signature(cache.compress_context).parameters
            extra = {"tokenizer": tokenizer} if "tokenizer" in accepts else {}  # KVzip's reconstruction prompt
            cache.compress_context(model, context_ids.to(model.device), **extra)
            logits = _forward(model, question_ids, cache, context_ids.shape[1])
        else:
            logits = _forward(model, torch.cat([context_ids, question_ids], dim=1), cache, 0)
        held = cache_bytes(cache)
        position = context_ids.shape[1] + question_ids.shape[1]
        tokens: list[int] = []
        while True:
            token = logits.argmax(-1, keepdim=True)
            tokens.append(int(token))
            if len(tokens) == new_tokens or int(token) == tokenizer.eos_token_id:
                break
            logits = _forward(model, token, cache, position)
            position += 1
    return {
        "generated": tokenizer.decode(tokens, skip_special_tokens=True),
        "cache_bytes": held,
        "compressed_once": once,
        "seconds": time.perf_counter() - started,
    }


def retrieval_rows(
    model,
    tokenizer,
    templates: Sequence[str],
    budgets: Sequence[int],
    samples: Sequence[Sample],
    new_tokens: int,
) -> list[dict]:
    """One row per (spec, budget): found/samples, accuracy, mean bytes held after the prompt, seconds.
    `dynamic` runs once (it does not depend on the budget); every spec sees the same `samples`."""
    parts = [prompt_parts(tokenizer, sample) for sample in samples]
    rows = []
    for template in templates:
        for budget in [None] if template == FULL else budgets:
            spec = template if budget is None else format_spec(template, budget)
            started = time.perf_counter()
            try:
                records = [answer_sample(model, tokenizer, spec, *part, new_tokens) for part in parts]
            except Exception as error:  # one failing policy must not lose the other rows of a long run
                rows.append(failed_row(spec, template, budget, error))
                continue
            scores = [score(sample, record["generated"]) for sample, record in zip(samples, records)]
            rows.append(
                {
                    "cache": spec,
                    "template": template,
                    "budget": budget,
                    "found": f"{sum(scores):g}/{len(samples)}",
                    "accuracy": sum(scores) / len(samples),
                    "mean_cache_bytes": sum(record["cache_bytes"] for record in records) / len(records),
                    "compressed_once": records[0]["compressed_once"],
                    "seconds": round(time.perf_counter() - started, 1),
                    "scores": scores,
                    "answers": [record["generated"][:40] for record in records],
                }
            )
            shown = {key: rows[-1][key] for key in ("cache", "found", "mean_cache_bytes", "seconds")}
            print(shown, flush=True)
    return rows


def failed_row(spec: str, template: str, budget: int | None, error: Exception) -> dict:
    """The row of a spec whose run raised: the error in one printed line, its traceback in the JSON."""
    print(f"FAILED {spec}: {type(error).__name__}: {error}", flush=True)
    return {
        "cache": spec,
        "template": template,
        "budget": budget,
        "error": f"{type(error).__name__}: {error}",
        "traceback": traceback.format_exc()[-3000:],
    }


# --- perplexity -------------------------------------------------------------------------------------------
def perplexity_rows(
    model, tokenizer, templates: Sequence[str], text: str, ppl_tokens: int, fraction: float, chunk: int
) -> tuple[list[dict], int, int]:
    """Perplexity of each spec on the first `ppl_tokens` tokens of `text`, at `fraction` of them kept.
    Returns the rows, the tokens evaluated and the budget."""
    ids = tokenizer(text[: ppl_tokens * 8], return_tensors="pt").input_ids[:, :ppl_tokens]
    budget = int(fraction * ids.shape[1])
    rows = []
    for template in templates:
        spec = format_spec(template, budget)
        cache = build_cache(spec, model.config)
        started = time.perf_counter()
        try:  # a compress-once cache is compressed after every chunk (`evaluation_pass`)
            with torch.no_grad(), score_capture(model, getattr(cache, "needs_score_capture", False)):
                record = evaluation_pass(model, ids, cache, chunk, tokenizer=tokenizer)
        except Exception as error:  # as in retrieval_rows
            rows.append(failed_row(spec, template, budget, error))
            continue
        rows.append(
            {
                "cache": spec,
                "template": template,
                "perplexity": record.perplexity,
                "final_cache_bytes": record.bytes_held[-1],
                "seconds": round(time.perf_counter() - started, 1),
            }
        )
        print({key: rows[-1][key] for key in ("cache", "perplexity", "seconds")}, flush=True)
    return rows, ids.shape[1], budget


# --- report -----------------------------------------------------------------------------------------------
def _cell(row: dict | None, show) -> str:
    if row is None:
        return "-"
    return "error" if "error" in row else show(row)


def summary_table(
    templates: Sequence[str], budgets: Sequence[int], retrieval: list[dict], perplexity: list[dict], ppl_budget: int
) -> list[dict]:
    """One row per spec template: accuracy and MiB held per budget, then perplexity at the perplexity budget."""
    table = []
    for template in templates:
        row: dict[str, object] = {"cache": row_label(template)}
        found = [r for r in retrieval if r["template"] == template]
        matches = {budget: next((r for r in found if r["budget"] in (budget, None)), None) for budget in budgets}
        for budget in budgets if retrieval else []:
            row[f"acc@{budget}"] = _cell(matches[budget], lambda r: f"{r['accuracy']:.0%}")
        for budget in budgets if retrieval else []:
            row[f"MiB@{budget}"] = _cell(matches[budget], lambda r: f"{r['mean_cache_bytes'] / MIB:.2f}")
        if perplexity:
            match = next((r for r in perplexity if r["template"] == template), None)
            row[f"ppl@{ppl_budget}"] = _cell(match, lambda r: f"{r['perplexity']:.2f}")
        table.append(row)
    return table


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=sorted(TASKS), default="passkey", help="the hidden fact (default: passkey)")
    parser.add_argument("--samples", type=int, default=None, help="retrieval prompts per cache and budget (50)")
    parser.add_argument("--budgets", type=int, nargs="+", default=None, help="token budgets (128 256)")
    parser.add_argument("--prompt-tokens", type=int, default=None, help="context + question tokens (800)")
    parser.add_argument(
        "--new-tokens", type=int, default=None, help="greedily decoded tokens per answer (8; other tasks: their own)"
    )
    parser.add_argument("--ppl-tokens", type=int, default=None, help="WikiText-2 tokens evaluated (4096)")
    parser.add_argument("--ppl-budget", type=float, default=0.2, help="fraction of --ppl-tokens kept (0.2)")
    parser.add_argument("--chunk", type=int, default=16, help="tokens per forward in the perplexity run")
    parser.add_argument("--text", type=Path, default=None, help="a plain-text file (default: bundled WikiText-2 test)")
    parser.add_argument("--model", default=None, help=MODEL_HELP)
    parser.add_argument("--output", type=Path, default=None, help="JSON file (benchmarks/results/retrieval.json)")
    parser.add_argument(
        "--specs",
        nargs="+",
        default=None,
        help="cache specs instead of the default set, {budget} standing for the budget (and {window} for "
        "budget - 4), e.g. 'snapkv:budget={budget},kernel_size=15'; dynamic is always added",
    )
    parser.add_argument("--skip-ppl", action="store_true")
    parser.add_argument("--skip-retrieval", action="store_true")
    parser.add_argument("--skip-full", action="store_true", help="leave out the full cache (dynamic)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: one spec per cache name, 2 samples of 400 tokens, budget 128, 256 perplexity tokens, "
        "output in the temp folder (explicit flags still win)",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name, (default, quick) in DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else default)
    if args.new_tokens is None:
        args.new_tokens = 8 if args.task == "passkey" else TASKS[args.task].max_new_tokens
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    command = shlex.join(["python", "benchmarks/retrieval.py", *(sys.argv[1:] if argv is None else argv)])
    load_policies()
    defaults = one_per_cache(DEFAULT_TEMPLATES) if args.quick else DEFAULT_TEMPLATES
    templates = available_templates(args.specs or defaults, explicit=args.specs is not None)
    if args.skip_full:
        templates.remove(FULL)

    torch.manual_seed(args.seed)
    model, tokenizer = load_model(args.model)
    budgets = [] if args.skip_retrieval else list(args.budgets)
    check_buildable(
        model.config, templates, budgets + ([] if args.skip_ppl else [int(args.ppl_budget * args.ppl_tokens)])
    )
    result: dict = {
        "model": args.model or DEFAULT_MODEL,
        "command": command,
        "settings": {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()},
        "specs": templates,
        "registered": sorted(registered_caches()),
        "version": hf_kvcache.__version__,
    }
    retrieval, perplexity, ppl_budget = [], [], 0
    if not args.skip_retrieval:
        samples = generate_samples(args.task, tokenizer, args.prompt_tokens, args.samples, args.seed)
        retrieval = retrieval_rows(model, tokenizer, templates, args.budgets, samples, args.new_tokens)
        result[args.task] = retrieval
        result["samples"] = [
            {
                "index": sample.index,
                "answers": list(sample.answers),
                "depths": [round(needle.depth, 4) for needle in sample.needles],
                "context_ids": context.shape[1],
                "question_ids": question.shape[1],
            }
            for sample, (context, question) in zip(samples, map(partial(prompt_parts, tokenizer), samples))
        ]
    if not args.skip_ppl:
        text = args.text.read_text(encoding="utf-8") if args.text else bundled_text("wikitext2")
        perplexity, ppl_tokens, ppl_budget = perplexity_rows(
            model, tokenizer, templates, text, args.ppl_tokens, args.ppl_budget, args.chunk
        )
        result["perplexity"] = perplexity
        result["perplexity_tokens"], result["perplexity_budget"] = ppl_tokens, ppl_budget
    result["errors"] = [f"{row['cache']}: {row['error']}" for row in retrieval + perplexity if "error" in row]
    result["summary"] = summary_table(templates, args.budgets, retrieval, perplexity, ppl_budget)

    if retrieval:
        print(
            f"\n{args.task} retrieval: {args.samples} samples, ~{args.prompt_tokens}-token prompts from Crime and "
            f"Punishment (seed {args.seed}); accuracy and MiB held after the prompt, per budget B"
        )
    if perplexity:
        print(
            f"WikiText-2 perplexity: {result['perplexity_tokens']} tokens, chunks of {args.chunk}, budget {ppl_budget}"
        )
    print(format_table(result["summary"]))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {args.output}")
    if result["errors"]:
        print(f"{len(result['errors'])} run(s) failed:", *result["errors"], sep="\n  ")
    return result


if __name__ == "__main__":
    sys.exit(1 if main()["errors"] else 0)
