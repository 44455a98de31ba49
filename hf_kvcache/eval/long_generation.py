"""Long generation: how closely a cache follows the full model over thousands of generated tokens.

Protocol (`evaluate_long_generation`):

1. The full cache (`DynamicCache`) generates `new_tokens` tokens from the prompt, greedily or, with a
   `temperature`, sampled with a seeded generator (end-of-sequence tokens included: the sequence always has
   `new_tokens` tokens). This is the reference sequence. A small model's greedy output soon repeats itself
   (the packaged SmolLM2-135M loops on one sentence after about 40 tokens of a book); a sampled reference keeps
   the history varied, so that following it means more than reproducing a loop.
2. Each cache replays the prompt (one prefill forward, as `generate` does) and then the reference sequence
   token by token. At every generated position the full model's next-token distribution is computed alongside
   (a `DynamicCache` fed the same tokens), and compared with the cache's: top-1 agreement (the cache's most
   likely token is the full model's) and KL(full || cache) in nats.
3. The first departure is the first position whose top-1 disagrees. With a greedy reference, free greedy
   generation through the cache follows exactly the replay's history until then (each step's input is the same
   token), so this is where free generation through the cache first differs from the full model's, with no
   second run; with a sampled one, where the cache's choice first differs on the same history.

Also per cache: bytes held at the end of the replay, at the end of each segment and at most (after any position:
a cache that compacts every N steps holds more between compactions), and decode tokens/s of the
cache's own single-token forwards (the reference forwards are not timed). A cache that keeps every token
exactly scores agreement 1.0 and KL 0. Compress-once policies (KVzip) compress a context before a question
and are not decode-time caches: they are refused.
"""

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from transformers import DynamicCache, PreTrainedModel

from hf_kvcache.caches.compress_once import compresses_once
from hf_kvcache.compat import CACHE_KWARG
from hf_kvcache.devices import input_device
from hf_kvcache.eval.memory import cache_bytes
from hf_kvcache.registry import CacheSpec, build_cache, parse_cache_spec
from hf_kvcache.scoring import score_capture
from hf_kvcache.validation import check_number


@dataclass
class LongGenerationResult:
    """One cache over one reference generation.

    `agrees` [new_tokens] bool and `kl` [new_tokens] float (nats) per generated position; `first_departure`
    the first position whose top-1 disagrees (None: none); `bytes_at` the bytes held after each segment of
    `segment_tokens` positions (the last one after the whole replay), `peak_bytes` the most held after any
    position (above the end figures for a cache that compacts every N steps); `decode_seconds` of the cache's
    single-token forwards (`new_tokens - 1` of them).
    """

    cache: str
    agrees: list[bool]
    kl: list[float]
    bytes_at: list[int]
    segment_tokens: int
    decode_seconds: float
    peak_bytes: int
    first_departure: int | None = field(init=False)

    def __post_init__(self):
        self.first_departure = next((index for index, agree in enumerate(self.agrees) if not agree), None)

    @property
    def agreement(self) -> float:
        return sum(self.agrees) / len(self.agrees)

    @property
    def mean_kl(self) -> float:
        return sum(self.kl) / len(self.kl)

    @property
    def cache_bytes(self) -> int:
        return self.bytes_at[-1]

    @property
    def decode_tokens_per_s(self) -> float | None:
        steps = len(self.agrees) - 1
        return steps / self.decode_seconds if steps and self.decode_seconds > 0 else None

    def segments(self) -> list[dict]:
        """Per segment of `segment_tokens` positions: its start and end, agreement, mean KL, bytes held at its end."""
        rows = []
        for index, start in enumerate(range(0, len(self.agrees), self.segment_tokens)):
            end = min(start + self.segment_tokens, len(self.agrees))
            agrees, kl = self.agrees[start:end], self.kl[start:end]
            rows.append(
                {
                    "cache": self.cache,
                    "start": start,
                    "end": end,
                    "agreement": sum(agrees) / len(agrees),
                    "mean_kl": sum(kl) / len(kl),
                    "bytes_held": self.bytes_at[index],
                }
            )
        return rows

    def summary(self) -> dict:
        return {
            "cache": self.cache,
            "agreement": self.agreement,
            "mean_kl": self.mean_kl,
            "first_departure": self.first_departure,
            "cache_bytes": self.cache_bytes,
            "peak_bytes": self.peak_bytes,
            "decode_tokens_per_s": self.decode_tokens_per_s,
        }


@torch.no_grad()
def reference_generation(
    model: PreTrainedModel, prompt_ids: torch.Tensor, new_tokens: int, temperature: float = 0.0, seed: int = 0
) -> list[int]:
    """`new_tokens` tokens after `prompt_ids` [1, prompt] through a `DynamicCache`: greedy (`temperature` 0), or
    sampled from softmax(logits / temperature) with a generator seeded with `seed`."""
    cache, tokens = DynamicCache(), []
    generator = torch.Generator().manual_seed(seed)
    logits = _next_logits(model, prompt_ids, cache)
    for _ in range(new_tokens):
        if temperature > 0:
            probabilities = F.softmax(logits.cpu().double() / temperature, dim=-1)
            tokens.append(int(torch.multinomial(probabilities, 1, generator=generator)))
        else:
            tokens.append(int(logits.argmax()))
        if len(tokens) < new_tokens:
            logits = _next_logits(model, torch.tensor([[tokens[-1]]]), cache)
    return tokens


def _next_logits(model: PreTrainedModel, input_ids: torch.Tensor, cache) -> torch.Tensor:
    """float32 [vocab]: the next-token logits after feeding `input_ids` [1, n] through `cache`."""
    logits = model(input_ids.to(input_device(model)), **{CACHE_KWARG: cache}, use_cache=True).logits
    return logits[0, -1].float()


def kl_divergence(reference_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """KL(softmax(reference) || softmax(logits)) in nats, computed in float64 (0 exactly for equal logits)."""
    reference = F.log_softmax(reference_logits.double(), dim=-1)
    candidate = F.log_softmax(logits.double(), dim=-1)
    return float((reference.exp() * (reference - candidate)).sum())


def decode_time_cache(spec: CacheSpec, model: PreTrainedModel):
    """The cache of `spec` for `model`.

    Raises:
        ValueError: a bad spec, or a compress-once policy (it compresses a context before a question, not while
            it generates).
    """
    cache = build_cache(spec, model.config)
    if compresses_once(cache):
        raise ValueError(
            f"--cache {spec.label}: a compress-once policy compresses a context before a question, not while it "
            "generates; long generation measures decode-time caches"
        )
    return cache


@torch.no_grad()
def replay(
    model: PreTrainedModel,
    prompt_ids: torch.Tensor,
    generated: Sequence[int],
    spec: CacheSpec | str,
    segment_tokens: int,
    progress=None,
) -> LongGenerationResult:
    """Replay `generated` after `prompt_ids` [1, prompt] through the cache of `spec`, beside a `DynamicCache`
    (see the module docstring). `progress`, if given, is called once per position (a tqdm `update`).

    Raises:
        ValueError: a bad spec, a compress-once cache, or `segment_tokens` < 1.
    """
    if not isinstance(segment_tokens, int) or segment_tokens < 1:
        raise ValueError(f"segment_tokens={segment_tokens!r} must be an integer >= 1")
    spec = parse_cache_spec(spec) if isinstance(spec, str) else spec
    cache = decode_time_cache(spec, model)
    agrees, kl, bytes_at, seconds, peak = [], [], [], 0.0, 0
    with score_capture(model, getattr(cache, "needs_score_capture", False)):
        reference = DynamicCache()
        reference_logits = _next_logits(model, prompt_ids, reference)
        logits = _next_logits(model, prompt_ids, cache)
        for position, token in enumerate(generated):
            agrees.append(int(logits.argmax()) == int(reference_logits.argmax()))
            kl.append(kl_divergence(reference_logits, logits))
            peak = max(peak, cache_bytes(cache))
            if position + 1 == len(generated) or (position + 1) % segment_tokens == 0:
                bytes_at.append(cache_bytes(cache))
            if progress is not None:
                progress(1)
            if position + 1 == len(generated):
                break
            step = torch.tensor([[token]])
            reference_logits = _next_logits(model, step, reference)
            began = time.perf_counter()
            logits = _next_logits(model, step, cache)
            seconds += time.perf_counter() - began
    return LongGenerationResult(spec.label, agrees, kl, bytes_at, segment_tokens, seconds, peak)


@dataclass
class LongGenerationRun:
    """A reference generation and every cache's replay of it."""

    model: str
    prompt_tokens: int
    generated: list[int]
    results: list[LongGenerationResult]
    temperature: float = 0.0  # of the reference generation (0: greedy)
    seed: int = 0

    def rows(self) -> list[dict]:
        """One table row per cache; speed as a ratio to the first cache."""
        first = self.results[0].decode_tokens_per_s if self.results else None
        rows = []
        for result in self.results:
            speed = result.decode_tokens_per_s
            rows.append(
                {
                    "cache": result.cache,
                    "top-1 agreement": result.agreement,
                    "mean KL (nats)": result.mean_kl,
                    "first departure": "none" if result.first_departure is None else result.first_departure,
                    "MiB held": result.cache_bytes / 2**20,
                    "peak MiB": result.peak_bytes / 2**20,
                    "decode tok/s": speed,
                    "speed ratio": speed / first if speed and first else None,
                }
            )
        return rows

    def segment_rows(self) -> list[dict]:
        return [
            {**row, "MiB held": row.pop("bytes_held") / 2**20} for result in self.results for row in result.segments()
        ]

    def to_json(self) -> dict:
        return {
            "model": self.model,
            "prompt_tokens": self.prompt_tokens,
            "temperature": self.temperature,
            "seed": self.seed,
            "generated": self.generated,
            "results": [{**result.summary(), **asdict(result)} for result in self.results],
        }


def evaluate_long_generation(
    model: PreTrainedModel,
    prompt_ids: torch.Tensor,
    caches: Sequence[CacheSpec | str],
    new_tokens: int,
    segment_tokens: int,
    model_name: str = "",
    progress: bool = True,
    temperature: float = 0.0,
    seed: int = 0,
) -> LongGenerationRun:
    """The reference generation of `new_tokens` tokens after `prompt_ids` [1, prompt] (greedy, or sampled at
    `temperature` with `seed`), then every cache's replay (`replay`), with tqdm bars unless `progress` is False.

    Raises:
        ValueError: `new_tokens` < 1, a negative or non-finite `temperature`, a bad spec, a compress-once cache
            (before any generation).
    """
    from tqdm.auto import tqdm

    if not isinstance(new_tokens, int) or new_tokens < 1:
        raise ValueError(f"new_tokens={new_tokens!r} must be an integer >= 1")
    check_number("temperature", temperature, minimum=0.0, inclusive=True)
    if not math.isfinite(temperature):
        raise ValueError(f"temperature={temperature!r} must be a finite number >= 0 (0: greedy)")
    specs = [parse_cache_spec(spec) if isinstance(spec, str) else spec for spec in caches]
    for spec in specs:  # fail on a bad spec before the long generation
        decode_time_cache(spec, model)
    generated = reference_generation(model, prompt_ids, new_tokens, temperature, seed)
    results = []
    for spec in specs:
        with tqdm(
            total=new_tokens, desc=f"replay {spec.label}", unit=" tok", disable=None if progress else True
        ) as bar:
            results.append(replay(model, prompt_ids, generated, spec, segment_tokens, bar.update))
    return LongGenerationRun(model_name, prompt_ids.shape[1], generated, results, temperature, seed)


def write_agreement_plot(run: LongGenerationRun, path, window: int) -> None:
    """PNG: each cache's top-1 agreement with the full model, a running mean over `window` positions, against
    the generated position."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 4.5))
    for result in run.results:
        agrees = torch.tensor(result.agrees, dtype=torch.float64)
        kernel = torch.ones(1, 1, min(window, len(agrees)), dtype=torch.float64)
        running = F.conv1d(agrees[None, None], kernel / kernel.numel())[0, 0]
        axis.plot(range(kernel.numel() - 1, len(agrees)), running.tolist(), label=result.cache)
    axis.set_xlabel("generated position (tokens)")
    axis.set_ylabel(f"top-1 agreement (running mean over {min(window, len(run.generated))})")
    axis.set_ylim(-0.02, 1.02)
    axis.set_title(f"{run.model}: following the full model over {len(run.generated):,} generated tokens", fontsize=10)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
