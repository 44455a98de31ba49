"""The evaluation pass: feed a text through a cache in steps, collect per-token NLL, bytes and times.

Perplexity is `exp(mean NLL)` over every token after the first, each predicted from all earlier tokens
as the cache presents them. In chunk mode a step is C tokens (a chunk sees its own keys in full
precision); in token mode it is one token (each token sees only the cache). A cache whose policy compresses
once (KVzip) is compressed after every step, by its own protocol (`caches.compress_once.compress_newest`),
so its later steps are predicted from what it kept; the compression counts in the forward time.
"""

import math
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.cache_utils import Cache

from hf_kvcache.caches.compress_once import compress_newest, compresses_once
from hf_kvcache.compat import CACHE_KWARG
from hf_kvcache.devices import input_device
from hf_kvcache.eval.memory import cache_bytes

MAX_EXP_ARGUMENT = math.log(sys.float_info.max)


@dataclass
class PassRecord:
    """What one pass measured: NLL of tokens 1..n-1, cache bytes after each step, forward time."""

    nll: torch.Tensor
    positions: list[int]
    bytes_held: list[int]
    forward_seconds: float
    forward_tokens: int
    last_logits: torch.Tensor

    @property
    def perplexity(self) -> float:
        return perplexity_of(self.nll.mean().item())


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def feed_in_steps(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    cache: Cache,
    step: int,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> Iterator[tuple[int, torch.Tensor, float]]:
    """Feed `input_ids` (batch, n) through `cache` `step` tokens at a time; after each step a cache whose policy
    compresses once is compressed by its protocol. Yields `(start, logits (batch, tokens, vocab), seconds)`
    per step, `seconds` being the forward's and the compression's. Call under `torch.no_grad()`."""
    if not isinstance(step, int) or step < 1:
        raise ValueError(f"step={step!r} must be an integer >= 1")
    device = input_device(model)
    input_ids = input_ids.to(device)
    compress = compresses_once(cache)
    for start in range(0, input_ids.shape[1], step):
        chunk = input_ids[:, start : start + step]
        _synchronize(device)
        began = time.perf_counter()
        logits = model(chunk, **{CACHE_KWARG: cache}, use_cache=True).logits
        if compress:
            compress_newest(cache, model, input_ids[:, : start + chunk.shape[1]], chunk.shape[1], tokenizer)
        _synchronize(device)
        yield start, logits, time.perf_counter() - began


@torch.no_grad()
def evaluation_pass(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    cache: Cache,
    step: int,
    progress=None,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> PassRecord:
    """Feed `input_ids` (1, n) through `cache` `step` tokens at a time (`feed_in_steps`).

    `progress`, if given, is called with the number of tokens of each step (a tqdm `update`). `tokenizer`
    tokenizes a compress-once policy's scoring prompt (None: the tokenizer saved with the model).
    """
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"input_ids must have shape (1, n), got {tuple(input_ids.shape)}")
    input_ids = input_ids.to(input_device(model))
    nlls, positions, bytes_held = [], [], []
    seconds = 0.0
    logits = None
    for start, step_logits, step_seconds in feed_in_steps(model, input_ids, cache, step, tokenizer):
        logits, count = step_logits[0], step_logits.shape[1]
        seconds += step_seconds
        targets = input_ids[0, start + 1 : start + count + 1]  # logits at position p predict token p + 1
        nlls.append(F.cross_entropy(logits[: len(targets)].float(), targets, reduction="none").double().cpu())
        positions.append(start + count)
        bytes_held.append(cache_bytes(cache))
        if progress is not None:
            progress(count)
    return PassRecord(torch.cat(nlls), positions, bytes_held, seconds, input_ids.shape[1], logits[-1:].clone())


@torch.no_grad()
def decode_speed(model: PreTrainedModel, cache: Cache, last_logits: torch.Tensor, steps: int, warmup: int = 2) -> float:
    """Greedy single-token decode through `cache` (continuing its text); tokens/s over `steps` after `warmup`."""
    device = input_device(model)
    token = last_logits.argmax(-1, keepdim=True).to(device)
    seconds = 0.0
    for index in range(warmup + steps):
        _synchronize(device)
        began = time.perf_counter()
        logits = model(token, **{CACHE_KWARG: cache}, use_cache=True).logits
        _synchronize(device)
        if index >= warmup:
            seconds += time.perf_counter() - began
        token = logits[:, -1].argmax(-1, keepdim=True)
    return steps / seconds


def full_sequence_nll(model: PreTrainedModel, input_ids: torch.Tensor) -> torch.Tensor:
    """Per-token NLL from one forward over the whole sequence with no cache (the reference)."""
    with torch.no_grad():
        logits = model(input_ids.to(input_device(model)), use_cache=False).logits[0, :-1].float()
    return F.cross_entropy(logits, input_ids[0, 1:].to(logits.device), reduction="none").double().cpu()


def bucket_perplexity(nll: torch.Tensor, bucket_size: int) -> list[float]:
    """Perplexity of consecutive buckets of `bucket_size` predicted tokens (the last may be shorter)."""
    return [perplexity_of(part.mean().item()) for part in nll.split(bucket_size)]


def perplexity_of(mean_nll: float) -> float:
    """exp(mean NLL), or infinity when that overflows a float (a mean NLL above ~709.8 nats: an untrained or
    diverged model), so that every result is still reported and written."""
    return math.exp(mean_nll) if mean_nll < MAX_EXP_ARGUMENT else math.inf
