"""Run the long-context tasks of `hf_kvcache.eval.tasks` through one cache strategy and score the answers.

The protocol is RULER's (Hsieh et al. 2024, https://arxiv.org/abs/2404.06654): the whole prompt goes
through the model in one prefill, the answer is decoded greedily and scored by string match. Caches that
evict after a forward (e.g. `window`) let the prefill see the whole prompt, so the first new token is
predicted from the full context and only the following ones from what the cache kept.

`evaluate_task` is a pure function of (model, tokenizer, spec, samples): samples can be split across
processes and the per-sample records joined again with `TaskResult.from_samples`.
"""

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from transformers import LogitsProcessor, LogitsProcessorList, PreTrainedModel, PreTrainedTokenizerBase

from hf_kvcache.caches.compress_once import compresses_once
from hf_kvcache.compat import CACHE_KWARG
from hf_kvcache.devices import input_device
from hf_kvcache.eval.memory import cache_bytes
from hf_kvcache.eval.results import check_close, exact_fields, record_int, record_list, record_number
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

    @classmethod
    def from_record(cls, record: object, label: str, settings: Mapping) -> "TaskResult":
        """The result a partial file holds, every sample record checked (types and ranges, against `settings`:
        `tasks`, `samples`, `seed`, `max_new_tokens`) and the figures recomputed from them: a tampered
        accuracy, byte count or relabelled spec is refused, never reported as measured.

        Raises:
            ValueError: the first field that is missing, of the wrong type, out of range or inconsistent.
        """
        fields = exact_fields(cls, record)
        task, spec = fields["task"], fields["spec"]
        if not isinstance(task, str) or not isinstance(spec, str) or label != f"{task}/{spec}":
            raise ValueError(f"task={task!r}, spec={spec!r} but the file is that of {label!r}")
        if task not in TASKS or task not in settings.get("tasks", [task]):
            raise ValueError(f"task={task!r} is not a task of this run")
        if fields["cache"] != parse_cache_spec(spec).name:
            raise ValueError(f"cache={fields['cache']!r} is not the strategy of spec {spec!r}")
        samples = record_list("samples", fields["samples"], settings.get("samples"))
        budget = settings.get("max_new_tokens") or TASKS[task].max_new_tokens
        for position, sample in enumerate(samples):
            _check_sample(sample, position, task, settings.get("seed"), budget)
        if not samples:
            raise ValueError("samples: no sample record; accepted: at least one")
        rebuilt = cls.from_samples(fields["cache"], spec, task, samples)
        record_number("accuracy", fields["accuracy"], 0.0)
        check_close("accuracy", fields["accuracy"], rebuilt.accuracy)
        record_number("mean_cache_bytes", fields["mean_cache_bytes"], 0.0)
        check_close("mean_cache_bytes", fields["mean_cache_bytes"], rebuilt.mean_cache_bytes)
        speed = fields["decode_tokens_per_s"]
        if rebuilt.decode_tokens_per_s is None or speed is None:
            if speed is not rebuilt.decode_tokens_per_s:
                raise ValueError(f"decode_tokens_per_s={speed!r} is not what the samples give")
        else:
            check_close(
                "decode_tokens_per_s", record_number("decode_tokens_per_s", speed, 0.0), rebuilt.decode_tokens_per_s
            )
        return rebuilt


_SAMPLE_FIELDS = {
    "task", "index", "seed", "context_tokens", "score", "generated", "depths", "cache_bytes", "new_tokens",
    "seconds", "prefill_seconds", "decode_tokens", "decode_seconds",
}  # fmt: skip


def _check_sample(sample: object, position: int, task: str, seed: object, budget: int) -> None:
    """One sample record of `evaluate_task`, in place `position` of the sorted records."""
    where = f"samples[{position}]"
    if not isinstance(sample, dict) or set(sample) != _SAMPLE_FIELDS:
        raise ValueError(f"{where}: accepted: an object with the fields {', '.join(sorted(_SAMPLE_FIELDS))}")
    if sample["task"] != task or sample["index"] != position or (seed is not None and sample["seed"] != seed):
        raise ValueError(f"{where}: task/index/seed {sample['task']!r}/{sample['index']!r}/{sample['seed']!r}")
    record_int(f"{where}.index", sample["index"], 0)
    record_int(f"{where}.context_tokens", sample["context_tokens"], 1)
    record_number(f"{where}.score", sample["score"], 0.0)
    if sample["score"] > 1:
        raise ValueError(f"{where}.score={sample['score']!r}: accepted: a number in [0, 1]")
    if not isinstance(sample["generated"], str) or len(sample["generated"]) > GENERATED_CHARS:
        raise ValueError(f"{where}.generated: accepted: a string of at most {GENERATED_CHARS} characters")
    for depth in record_list(f"{where}.depths", sample["depths"]):
        if not (record_number(f"{where}.depths", depth, 0.0) <= 1):
            raise ValueError(f"{where}.depths: {depth!r}; accepted: numbers in [0, 1]")
    record_int(f"{where}.cache_bytes", sample["cache_bytes"], 0)
    new_tokens = record_int(f"{where}.new_tokens", sample["new_tokens"], 0)
    if new_tokens > budget:
        raise ValueError(f"{where}.new_tokens={new_tokens!r}: accepted: at most the answer budget {budget}")
    decode_tokens = record_int(f"{where}.decode_tokens", sample["decode_tokens"], 0)
    if decode_tokens > max(new_tokens - 1, 0):
        raise ValueError(f"{where}.decode_tokens={decode_tokens!r}: accepted: at most new_tokens - 1")
    for name in ("seconds", "prefill_seconds", "decode_seconds"):
        record_number(f"{where}.{name}", sample[name], 0.0)


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
