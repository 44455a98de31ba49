"""`evaluate_tasks`: retrieval and long-context tasks (`eval.tasks`) through every cache spec, samples shared
out among processes."""

import csv
import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from accelerate.utils import gather_object
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from hf_kvcache.devices import input_device
from hf_kvcache.eval.runner import library_versions, parse_specs, prepare_model, process_state, reusable_results
from hf_kvcache.eval.task_eval import TaskResult, evaluate_task, prompt_ids
from hf_kvcache.eval.tasks import TASKS, generate_samples
from hf_kvcache.prefix.keys import model_fingerprint
from hf_kvcache.registry import CacheSpec
from hf_kvcache.report import format_table
from hf_kvcache.validation import check_choice, check_int

CSV_COLUMNS = ("task", "cache", "accuracy", "mean_cache_bytes", "decode_tokens_per_s", "samples")


@dataclass
class TaskRun:
    """A task run: its settings, library versions, one `TaskResult` per (task, cache spec), and how the
    samples were split among processes (`distribution`)."""

    model: str
    tasks: list[str]
    context_tokens: int
    samples: int
    seed: int
    device: str
    dtype: str
    versions: dict[str, str]
    results: list[TaskResult]
    distribution: dict = field(default_factory=dict)

    def table_rows(self) -> list[dict]:
        return [
            {
                "task": r.task,
                "cache": r.spec,
                "accuracy": r.accuracy,
                "cache MiB": r.mean_cache_bytes / 2**20,
                "decode tok/s": "-" if r.decode_tokens_per_s is None else r.decode_tokens_per_s,
            }
            for r in self.results
        ]

    def table(self) -> str:
        header = f"{self.model}: {self.samples} samples of {self.context_tokens:,} tokens per task, seed {self.seed}"
        return header + "\n" + format_table(self.table_rows())

    def write_json(self, path: Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=1) + "\n", encoding="utf-8")

    def write_csv(self, path: Path) -> None:
        with open(path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
            writer.writeheader()
            for r in self.results:
                row = {name: getattr(r, name) for name in CSV_COLUMNS if name not in ("cache", "samples")}
                writer.writerow({**row, "cache": r.spec, "samples": len(r.samples)})


def prompts_digest(tokenizer: PreTrainedTokenizerBase, samples_of: Mapping[str, Sequence]) -> str:
    """sha256 of every sample's prompt ids and expected answers: what a task result was measured on (the book,
    the generator and the tokenizer with its chat template all show in it)."""
    digest = hashlib.sha256()
    for task, task_samples in samples_of.items():
        for sample in task_samples:
            ids = prompt_ids(tokenizer, sample)[0].tolist()
            digest.update(json.dumps([task, sample.index, ids, list(sample.answers)]).encode())
    return digest.hexdigest()


def evaluate_tasks(
    caches: Sequence[str | CacheSpec],
    tasks: Sequence[str],
    model: PreTrainedModel | str | Path | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    context_tokens: int = 2048,
    samples: int = 10,
    seed: int = 0,
    max_new_tokens: int | None = None,
    device: str | None = None,
    dtype: str | None = None,
    device_map: str | None = None,
    progress: bool = True,
    done: Mapping[str, TaskResult] | Callable[[dict], Mapping[str, TaskResult]] | None = None,
    on_result: Callable[[str, TaskResult], None] | None = None,
) -> TaskRun:
    """Accuracy of every cache spec on every task, with the bytes each cache held and its decode speed.

    Samples are generated locally from the bundled public-domain book (`eval.tasks`), the same for every
    cache. Under `accelerate launch` / torchrun the samples of each (task, cache) are shared out among the
    processes and their records gathered, so the result equals a one-process run's.

    Args:
        caches: cache specs; tasks: names of `eval.tasks.TASKS`.
        context_tokens: prompt length in tokens; samples: samples per task; seed: the samples' seed.
        max_new_tokens: answer budget (default: each task's own).
        done: results already measured, by `"<task>/<cache label>"` (not measured again), or a callable given
            the run's identity (`model_weights`: `model_fingerprint(model)`, `prompts_sha256`: the samples'
            prompt ids and answers) that returns them (see `runner.reusable_results`);
        on_result: called with that label and each result as soon as it is measured.

    Raises:
        ValueError: an unknown task or cache spec, or a bad count (named), before any model work.
    """
    for task in tasks:
        check_choice("task", task, tuple(TASKS))
    check_int("context_tokens", context_tokens, minimum=1)
    check_int("samples", samples, minimum=1)
    specs = parse_specs(caches)
    state = process_state(device)
    model, tokenizer, model_name = prepare_model(model, tokenizer, specs, state, device, dtype, device_map)
    if tokenizer is None:
        raise ValueError("a loaded model needs its tokenizer for the tasks' prompts")
    samples_of = {task: generate_samples(task, tokenizer, context_tokens, samples, seed) for task in tasks}
    done = reusable_results(
        done,
        state,
        lambda: {"model_weights": model_fingerprint(model), "prompts_sha256": prompts_digest(tokenizer, samples_of)},
    )
    results, mine_by_label = [], {}
    for task in tasks:
        task_samples = samples_of[task]
        for spec in specs:
            label = f"{task}/{spec.label}"
            if label in done:
                results.append(done[label])
                continue
            with (
                state.split_between_processes(task_samples) as mine,
                tqdm(total=len(mine), desc=label, unit="sample", disable=not progress, leave=False) as bar,
            ):
                records = (
                    evaluate_task(model, tokenizer, spec, mine, max_new_tokens, bar.update).samples if mine else []
                )
            mine_by_label[label] = [record["index"] for record in records]
            if state.num_processes > 1:
                records = gather_object(records)
            result = TaskResult.from_samples(spec.name, spec.label, task, sorted(records, key=lambda r: r["index"]))
            results.append(result)
            if on_result is not None and state.is_main_process:
                on_result(label, result)
    this_process = {"process": state.process_index, "device": str(input_device(model)), "samples": mine_by_label}
    processes = gather_object([this_process]) if state.num_processes > 1 else [this_process]
    return TaskRun(
        model=model_name,
        tasks=list(tasks),
        context_tokens=context_tokens,
        samples=samples,
        seed=seed,
        device=str(input_device(model)),
        dtype=str(model.dtype).removeprefix("torch."),
        versions=library_versions(),
        results=results,
        distribution={"num_processes": state.num_processes, "processes": processes, "reused": sorted(done)},
    )
