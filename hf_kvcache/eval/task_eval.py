"""Run the long-context tasks of `hf_kvcache.eval.tasks` through one cache strategy and score the answers.

The protocol is RULER's (Hsieh et al. 2024, https://arxiv.org/abs/2404.06654): the whole prompt goes
through the model in one prefill, the answer is decoded greedily and scored by string match. Caches that
evict after a forward (e.g. `window`) let the prefill see the whole prompt, so the first new token is
predicted from the full context and only the following ones from what the cache kept.

`evaluate_task` is a pure function of (model, tokenizer, spec, samples): samples can be split across
processes and the per-sample records joined again with `TaskResult.from_samples`.
"""

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from transformers import LogitsProcessor, LogitsProcessorList, PreTrainedModel, PreTrainedTokenizerBase

from hf_kvcache.caches.compress_once import compresses_once
from hf_kvcache.compat import CACHE_KWARG
from hf_kvcache.devices import input_device
from hf_kvcache.eval.memory import cache_bytes
from hf_kvcache.eval.tasks import TASKS, Sample, score
from hf_kvcache.registry import CacheSpec, build_cache, parse_cache_spec
from hf_kvcache.scoring import score_capture
from hf_kvcache.validation import check_optional_int

GENERATED_CHARS = 200  # generated text kept per sample record


@dataclass
class TaskResult:
    """One cache strategy on one task.

    `cache`: the strategy name; `spec`: the full spec label; `accuracy`: mean score in [0, 1];
    `samples`: one record per sample (see `evaluate_task`); `mean_cache_bytes`: bytes the cache held after
    generation, averaged over samples; `decode_tokens_per_s`: new tokens after the first, per second of
    the forwards that produced them (None when no sample decoded past its first token).
    """

    cache: str
    spec: str
    task: str
    accuracy: float
    samples: list[dict] = field(repr=False)
    mean_cache_bytes: float
    decode_tokens_per_s: float | None

    @classmethod
    def from_samples(cls, cache: str, spec: str, task: str, sample_results: Sequence[dict]) -> "TaskResult":
        """The result of per-sample records, e.g. those of several shards joined.

        Raises:
            ValueError: no records, or records of another task.
        """
        if not sample_results:
            raise ValueError("sample_results=[] holds no sample record; accepted: at least one record")
        other = sorted({record["task"] for record in sample_results} - {task})
        if other:
            raise ValueError(f"task={task!r} but sample_results hold records of task(s) {', '.join(other)}")
        count = len(sample_results)
        decode_seconds = sum(record["decode_seconds"] for record in sample_results)
        decode_tokens = sum(record["decode_tokens"] for record in sample_results)
        return cls(
            cache=cache,
            spec=spec,
            task=task,
            accuracy=sum(record["score"] for record in sample_results) / count,
            samples=list(sample_results),
            mean_cache_bytes=sum(record["cache_bytes"] for record in sample_results) / count,
            decode_tokens_per_s=decode_tokens / decode_seconds if decode_tokens and decode_seconds > 0 else None,
        )


class _StepClock(LogitsProcessor):
    """Notes the time of each generation step: `generate` calls it once per new token, right after the
    forward that produced the logits (the first call follows the prefill)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if scores.device.type == "cuda":
            torch.cuda.synchronize(scores.device)
        self.times.append(time.perf_counter())
        return scores


def _prompt_text(tokenizer: PreTrainedTokenizerBase, sample: Sample) -> tuple[str, bool]:
    """The text `prompt_ids` tokenizes and whether the tokenizer adds its special tokens to it."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": sample.prompt}], tokenize=False, add_generation_prompt=True
        )
        return text + sample.answer_prefix, False
    return sample.text, True


def prompt_ids(tokenizer: PreTrainedTokenizerBase, sample: Sample) -> torch.Tensor:
    """Token ids (1, n) of the sample: the prompt as a user turn of the chat template, followed by the
    answer prefix, when the tokenizer has a template; else `sample.text` as raw text."""
    text, special = _prompt_text(tokenizer, sample)
    return torch.tensor([tokenizer(text, add_special_tokens=special)["input_ids"]], dtype=torch.long)


def context_length(tokenizer: PreTrainedTokenizerBase, sample: Sample, ids: torch.Tensor) -> int:
    """How many of the sample's `prompt_ids` (1, n) belong to its context (`sample.context`, the prompt
    before its question, with the chat template's opening): the tokens a compress-once cache compresses
    before the question is fed. Counted as the ids the text up to the context's end shares with `ids`, at
    least 1 and at most n - 1 (`generate` needs a token to feed)."""
    text, special = _prompt_text(tokenizer, sample)
    cut = text.index(sample.prompt) + len(sample.context)
    context = tokenizer(text[:cut], add_special_tokens=special)["input_ids"]
    shared = next((i for i, (a, b) in enumerate(zip(context, ids[0].tolist())) if a != b), len(context))
    return min(max(shared, 1), ids.shape[1] - 1)


@torch.no_grad()
def evaluate_task(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    spec: CacheSpec | str,
    samples: Sequence[Sample],
    max_new_tokens: int | None = None,
    progress: Callable[[int], object] | None = None,
) -> TaskResult:
    """Generate an answer to every sample with a fresh cache built from `spec`, and score it.

    Each sample: a new cache (`build_cache(spec, model.config)`), greedy `model.generate` of at most
    `max_new_tokens` tokens (default: the task's own answer budget, `TASKS[task].max_new_tokens`), the new
    tokens decoded and scored with `tasks.score`. Score-based caches get score capture enabled on the
    model while they run (outputs of other caches are unchanged by it). A cache whose policy compresses once
    (KVzip) takes the sample's context through `compress_context` first (`context_length`), then the
    question and the answer through `generate`; its compression counts in `prefill_seconds`.

    A sample record holds: `task`, `index`, `seed`, `context_tokens` (prompt tokens fed, chat template
    included), `score`, `generated` (the first `GENERATED_CHARS` characters), `depths` (needle depths),
    `cache_bytes` (held after generation), `new_tokens`, `seconds` (whole generation), `prefill_seconds`
    (until the first new token's logits), `decode_tokens` and `decode_seconds` (the steps after it).
    `progress`, if given, is called with 1 after each sample (a tqdm `update`).

    Raises:
        ValueError: no samples, samples of several tasks, a bad `max_new_tokens` or an unknown spec.
    """
    if not samples:
        raise ValueError("samples=[] holds no sample; accepted: at least one Sample from tasks.generate_samples")
    tasks = sorted({sample.task for sample in samples})
    if len(tasks) > 1:
        raise ValueError(f"samples mix tasks {', '.join(tasks)}; accepted: samples of one task")
    check_optional_int("max_new_tokens", max_new_tokens, minimum=1)
    spec = parse_cache_spec(spec) if isinstance(spec, str) else spec
    task = tasks[0]
    max_new_tokens = max_new_tokens or TASKS[task].max_new_tokens
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    records = []
    for sample in samples:
        cache = build_cache(spec, model.config)
        ids = prompt_ids(tokenizer, sample).to(input_device(model))
        clock = _StepClock()
        with score_capture(model, getattr(cache, "needs_score_capture", False)):
            started = time.perf_counter()
            if compresses_once(cache):  # the context first, by the policy's protocol; then the question
                cache.compress_context(model, ids[:, : context_length(tokenizer, sample, ids)], tokenizer=tokenizer)
            output = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                **{CACHE_KWARG: cache},
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad_token_id,
                logits_processor=LogitsProcessorList([clock]),
            )
        seconds = time.perf_counter() - started
        new = output[0, ids.shape[1] :]
        generated = tokenizer.decode(new, skip_special_tokens=True)
        records.append(
            {
                "task": task,
                "index": sample.index,
                "seed": sample.seed,
                "context_tokens": ids.shape[1],
                "score": score(sample, generated),
                "generated": generated[:GENERATED_CHARS],
                "depths": [round(needle.depth, 4) for needle in sample.needles],
                "cache_bytes": cache_bytes(cache),
                "new_tokens": len(new),
                "seconds": seconds,
                "prefill_seconds": clock.times[0] - started,
                "decode_tokens": len(clock.times) - 1,
                "decode_seconds": clock.times[-1] - clock.times[0],
            }
        )
        if progress is not None:
            progress(1)
    return TaskResult.from_samples(spec.name, spec.label, task, records)
