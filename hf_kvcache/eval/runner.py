"""`evaluate`: run every cache spec over the same tokens and collect their figures."""

import hashlib
import importlib.metadata
import platform
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list, gather_object
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from hf_kvcache.devices import input_device
from hf_kvcache.eval.data import load_text, tokenize_text
from hf_kvcache.eval.memory import PeakMemory
from hf_kvcache.eval.perplexity import bucket_perplexity, decode_speed, evaluation_pass
from hf_kvcache.eval.results import CacheResult, EvalResults
from hf_kvcache.models import load_model, model_title
from hf_kvcache.prefix.keys import model_fingerprint
from hf_kvcache.registry import CacheSpec, build_cache, parse_cache_spec
from hf_kvcache.scoring import score_capture

DEFAULT_CACHES = ("dynamic", "quantized:bits=4", "quantized:bits=2")
MODES = ("chunk", "token")
_PACKAGES = ("torch", "transformers", "datasets", "hf_kvcache", "optimum-quanto", "hqq", "psutil", "matplotlib")


def library_versions() -> dict[str, str]:
    """Versions of Python and of the libraries that shape the figures (installed ones only)."""
    versions = {"python": platform.python_version()}
    for package in _PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def parse_specs(caches: Sequence[str | CacheSpec]) -> list[CacheSpec]:
    """Parse every spec; refuse an empty list and duplicate labels."""
    specs = [spec if isinstance(spec, CacheSpec) else parse_cache_spec(spec) for spec in caches]
    if not specs:
        raise ValueError("no cache given; pass at least one cache spec, e.g. --cache dynamic")
    labels = [spec.label for spec in specs]
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise ValueError(f"cache specs given twice: {', '.join(duplicates)}")
    return specs


def process_state(device: str | None) -> PartialState:
    """This process's place in the run: one process unless started by `accelerate launch` / torchrun. Without
    a GPU (or with `device="cpu"`) the processes share out the work on the CPU (gloo), which accelerate only
    does when told so."""
    return PartialState(cpu=device == "cpu" or not torch.cuda.is_available())


def prepare_model(
    model: PreTrainedModel | str | Path | None,
    tokenizer: PreTrainedTokenizerBase | None,
    specs: Sequence[CacheSpec],
    state: PartialState,
    device: str | None,
    dtype: str | None,
    device_map: str | None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None, str]:
    """`(model, tokenizer, name)`: a model given by name loaded (on this process's device when several
    processes share the run); every spec is built once, and those that need score capture are checked to get
    it on this model (then it is switched off again: each spec runs with what it needs, see `needs_capture`)."""
    if isinstance(model, PreTrainedModel):
        model_name = model.config.name_or_path or type(model).__name__
    else:
        model_name = model_title(model)
        if device is None and device_map is None and state.num_processes > 1:
            device = str(state.device)
        try:
            model, tokenizer = load_model(model, dtype=dtype, device=device, device_map=device_map)
        except OSError as error:
            raise RuntimeError(f"cannot load model {model_name!r}: {str(error).strip().splitlines()[0]}") from error
    for spec in specs:  # fail on a bad spec before spending time on the others
        with score_capture(model, needs_capture(spec, model)):
            pass
    return model, tokenizer, model_name


Reuse = Mapping | Callable[[dict], Mapping] | None


def tokens_digest(input_ids: torch.Tensor) -> str:
    """sha256 of token ids (as int64): what a result was measured on, whatever the tokenizer."""
    return hashlib.sha256(input_ids.detach().to("cpu", torch.int64).contiguous().numpy().tobytes()).hexdigest()


def reusable_results(done: Reuse, state: PartialState, identity: Callable[[], dict]) -> dict:
    """The results `done` says need not be measured again. `done` may be a mapping, or a callable given the
    run's `identity()` (the model's weight fingerprint and the inputs' hashes, known only once the model and
    data are loaded) that binds where results are saved and returns those of that identity. With several
    processes the main process's identity and results are shared with all, so every process agrees on
    what is left to measure."""
    if not callable(done):
        return dict(done or {})
    if state.num_processes == 1:
        return dict(done(identity()))
    shared = [identity() if state.is_main_process else None]
    broadcast_object_list(shared)
    found = [dict(done(shared[0]))]  # every process: the callable binds where results are saved
    broadcast_object_list(found)
    return found[0]


def needs_capture(spec: CacheSpec, model: PreTrainedModel) -> bool:
    """Whether the cache of `spec` evicts by attention scores (then the model captures them while it runs)."""
    return getattr(build_cache(spec, model.config), "needs_score_capture", False)


def evaluate(
    caches: Sequence[str | CacheSpec] = DEFAULT_CACHES,
    model: PreTrainedModel | str | Path | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    dataset: str = "wikitext2",
    max_tokens: int = 2048,
    mode: str = "chunk",
    chunk_size: int = 64,
    device: str | None = None,
    dtype: str | None = None,
    seed: int = 0,
    bucket_size: int | None = None,
    decode_tokens: int = 16,
    input_ids: torch.Tensor | None = None,
    use_hub: bool | None = None,
    progress: bool = True,
    device_map: str | None = None,
    done: Mapping[str, CacheResult] | Callable[[dict], Mapping[str, CacheResult]] | None = None,
    on_result: Callable[[CacheResult], None] | None = None,
) -> EvalResults:
    """Measure perplexity, cache bytes, peak memory and speed of each cache spec on the same tokens.

    Under `accelerate launch --num_processes N` the caches are shared out among the N processes (each on
    its own device, each cache measured whole by one process, so every figure equals a one-process run's)
    and every process returns the whole run; `EvalResults.distribution` records who measured what.

    Args:
        caches: cache specs (`"quantized:bits=2"`) or `CacheSpec`s; ratios are to the first one.
        model: a loaded model (then pass its `tokenizer`, or `input_ids`), a hub id or local path, a
            packaged model's name ("gemma3-270m"), or None for the packaged SmolLM2-135M-Instruct.
        dataset: `wikitext2`, `pg19`, or a local `.txt` / `.jsonl` / `.parquet` file; ignored when
            `input_ids` (shape (1, n)) are given.
        max_tokens: tokens of the text to evaluate (the first `max_tokens`).
        mode: `chunk` (steps of `chunk_size` tokens) or `token` (one token per step).
        device, dtype: where and how to load a model given by name (default CPU, or each process's device
            under accelerate; float32).
        device_map: e.g. "auto": spread a model given by name over the available devices (larger than one
            device); caches keep each layer's tensors on that layer's device.
        bucket_size: predicted tokens per perplexity bucket (default: max_tokens / 8, at most 256).
        decode_tokens: greedy decode steps after the text, timed for decode tokens/s.
        use_hub: None tries the hub when reachable, False uses the bundled copies.
        done: results already measured (by label), e.g. from an interrupted run: not measured again; or a
            callable given the run's identity (`model_weights`: `model_fingerprint(model)`, `dataset_sha256`:
            the dataset file's bytes, `tokens_sha256`: the token ids evaluated) that returns them, so that only
            results of the same weights and text are reused (see `reusable_results`).
        on_result: called with each result as soon as it is measured (to save it).

    Raises:
        ValueError: a bad mode, chunk size, decode steps or cache spec (before any model work).
        RuntimeError: a model that cannot be loaded.
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not supported; accepted values: {', '.join(MODES)}")
    if mode == "chunk" and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size={chunk_size!r} must be an integer >= 1")
    if not isinstance(decode_tokens, int) or decode_tokens < 1:
        raise ValueError(f"decode_tokens={decode_tokens!r} must be an integer >= 1")
    specs = parse_specs(caches)
    # One process unless started by `accelerate launch` / torchrun; without a GPU the processes share out the
    # work on the CPU (gloo), which accelerate only does when told so.
    state = process_state(device)
    text = load_text(dataset, use_hub) if input_ids is None else None
    model, tokenizer, model_name = prepare_model(model, tokenizer, specs, state, device, dtype, device_map)
    if input_ids is None:
        if tokenizer is None:
            raise ValueError("a loaded model needs its tokenizer (or pass input_ids)")
        input_ids = tokenize_text(text, tokenizer, max_tokens)
        dataset, data_source = text.dataset, text.source
    else:
        dataset, data_source = "input_ids", "token ids given to evaluate()"
    length = input_ids.shape[1]
    step = chunk_size if mode == "chunk" else 1
    bucket_size = bucket_size or max(1, min(256, (length - 1) // 8))
    sha256 = text.sha256 if text is not None else None
    done = reusable_results(
        done,
        state,
        lambda: {
            "model_weights": model_fingerprint(model),
            "dataset_sha256": sha256,
            "tokens_sha256": tokens_digest(input_ids),
        },
    )

    todo = [spec for spec in specs if spec.label not in done]
    measured = []
    with state.split_between_processes(todo) as mine:
        for spec in mine:
            result = _measure(model, spec, input_ids, step, mode, seed, bucket_size, decode_tokens, progress, tokenizer)
            measured.append((state.process_index, str(input_device(model)), result))
            if on_result is not None:
                on_result(result)
    if state.num_processes > 1:
        measured = gather_object(measured)
    by_label = {result.cache: result for _, _, result in measured} | done
    processes: dict[int, dict] = {}
    for index, where, result in measured:
        processes.setdefault(index, {"process": index, "device": where, "caches": []})["caches"].append(result.cache)
    run = EvalResults(
        model=model_name,
        dataset=dataset,
        data_source=data_source,
        mode=mode,
        chunk_size=chunk_size if mode == "chunk" else None,
        max_tokens=length,
        decode_tokens=decode_tokens,
        seed=seed,
        device=str(input_device(model)),
        dtype=str(model.dtype).removeprefix("torch."),
        versions=library_versions(),
        results=[by_label[spec.label] for spec in specs],
        distribution={
            "num_processes": state.num_processes,
            "processes": [processes[index] for index in sorted(processes)],
            "reused": [spec.label for spec in specs if spec.label in done],
        },
    )
    run.fill_ratios()
    return run


def _measure(
    model: PreTrainedModel,
    spec: CacheSpec,
    input_ids: torch.Tensor,
    step: int,
    mode: str,
    seed: int,
    bucket_size: int,
    decode_tokens: int,
    progress: bool,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> CacheResult:
    """One cache spec over the whole text: a short warm-up pass, then the measured pass and decoding
    (`tokenizer`: for a compress-once policy's scoring prompt)."""
    length = input_ids.shape[1]
    torch.manual_seed(seed)
    warmup = input_ids[:, : min(length, 2 * step if mode == "chunk" else 8)]
    cache = build_cache(spec, model.config)
    with score_capture(model, getattr(cache, "needs_score_capture", False)):
        evaluation_pass(model, warmup, build_cache(spec, model.config), step, tokenizer=tokenizer)
        with (
            PeakMemory(input_device(model)) as peak,
            tqdm(total=length, desc=spec.label, unit="tok", disable=not progress, leave=False) as bar,
        ):
            record = evaluation_pass(model, input_ids, cache, step, progress=bar.update, tokenizer=tokenizer)
            decode = decode_speed(model, cache, record.last_logits, decode_tokens)
    return CacheResult(
        cache=spec.label,
        spec={"name": spec.name, "params": dict(spec.params)},
        tokens=len(record.nll),
        perplexity=record.perplexity,
        mean_nll=record.nll.mean().item(),
        bucket_size=bucket_size,
        bucket_perplexity=bucket_perplexity(record.nll, bucket_size),
        nll=record.nll.tolist(),
        memory_positions=record.positions,
        memory_bytes=record.bytes_held,
        cache_bytes=record.bytes_held[-1],
        peak_memory_bytes=peak.peak,
        peak_memory_kind=peak.kind,
        prefill_tokens_per_s=record.forward_tokens / record.forward_seconds if mode == "chunk" else None,
        decode_tokens_per_s=decode,
    )
