"""The compress-once protocol (`policies.base.CompressOncePolicy`, KVzip today), run by the cache, not the policy.

`compress_context`: a context goes into an empty eviction cache in forwards of the policy's `chunk_size`
tokens (nothing is evicted), then every chunk is scored by one forward of the policy's prompt followed by
that chunk again (preceded by the last `ANCHOR_TOKENS` tokens of the chunk before it), after which the
forward's tokens are forgotten; finally each head keeps the `budget` tokens with the highest score.
`compress_newest` does the same for the newest tokens of a cache already holding them: a text read in
chunks (the evaluation's perplexity pass) is compressed after each chunk, by scoring that chunk.
"""

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from hf_kvcache.compat import CACHE_KWARG
from hf_kvcache.policies.base import CompressOncePolicy
from hf_kvcache.scoring import CAPTURE_PREFIX, ScoreCaptureError

ANCHOR_TOKENS = 8  # context tokens before a chunk, repeated after the prompt so that the model knows where to resume


def compresses_once(cache: object) -> bool:
    """Whether `cache` must take a context through `compress_context` (its policy compresses once)."""
    return isinstance(getattr(cache, "policy", None), CompressOncePolicy)


@torch.no_grad()
def compress_context(
    cache,
    model: PreTrainedModel,
    context_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> None:
    """Prefill `context_ids` [batch, length] (left padding marked 0 in `attention_mask` [batch, length]) into
    the empty eviction `cache`, score it by the policy's scoring forwards and keep each head's best `budget`.

    Positions count each row's real tokens from 0, as `generate` does, so a row keeps the same tokens in a
    padded batch as alone. Afterwards `cache.get_seq_length()` is `length`: feed the questions from there.

    Raises:
        ScoreCaptureError: the model's score capture is off (`hf_kvcache.enable_score_capture(model)`).
        ValueError: a non-empty cache, a row without real tokens, shapes that disagree, or a prompt that needs
            a tokenizer (see the policy's `prompt_ids`).
    """
    _check_capture(model)
    if cache.get_seq_length() != 0:
        raise ValueError("compress_context fills an empty cache: call cache.reset() or build a new one")
    ids = torch.as_tensor(context_ids)
    ids = ids[None] if ids.dim() == 1 else ids
    mask = torch.ones_like(ids) if attention_mask is None else torch.as_tensor(attention_mask).to(ids.device)
    if ids.dim() != 2 or mask.shape != ids.shape or ids.shape[1] == 0:
        raise ValueError(
            f"context_ids {tuple(ids.shape)} and attention_mask {tuple(mask.shape)} must be the same "
            "non-empty [batch, length]"
        )
    if not bool(mask.any(dim=1).all()):
        raise ValueError("every row of the context needs at least one real token (attention_mask all 0)")
    policy = cache.policy
    prompt = torch.tensor(policy.prompt_ids(model, tokenizer), dtype=ids.dtype, device=ids.device)
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    for start in range(0, ids.shape[1], policy.chunk_size):
        end = start + policy.chunk_size
        _forward(model, cache, ids[:, start:end], mask[:, :end], positions[:, start:end])
    _score_and_keep(cache, model, ids, mask, prompt, first=0)


@torch.no_grad()
def compress_newest(
    cache,
    model: PreTrainedModel,
    seen_ids: torch.Tensor,
    newest: int,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> None:
    """Score the newest `newest` tokens of `cache`, which has seen exactly `seen_ids` [batch, seen] (no
    padding), by the policy's scoring forwards over them, and keep each head's best `budget` of everything
    held. Nothing is scored while every layer holds at most its budget (selection would keep them all).

    Raises:
        ScoreCaptureError: as `compress_context`.
        ValueError: `seen_ids` of another length than the cache has seen, or `newest` out of [1, seen].
    """
    _check_capture(model)
    seen = seen_ids.shape[-1]
    if seen != cache.get_seq_length() or not 1 <= newest <= seen:
        raise ValueError(
            f"seen_ids hold {seen} tokens and newest={newest!r}; accepted: the {cache.get_seq_length()} tokens "
            "the cache has seen, and 1 <= newest <= that"
        )
    if not cache.over_budget():
        return
    prompt = torch.tensor(cache.policy.prompt_ids(model, tokenizer), dtype=seen_ids.dtype, device=seen_ids.device)
    _score_and_keep(cache, model, seen_ids, torch.ones_like(seen_ids), prompt, first=seen - newest)


def _check_capture(model: PreTrainedModel) -> None:
    if not model.config._attn_implementation.startswith(CAPTURE_PREFIX):
        raise ScoreCaptureError(
            "a compress-once policy (KVzip) scores its scoring forwards' attention: call "
            "`hf_kvcache.enable_score_capture(model)` (or use `hf_kvcache.score_capture(model)`) first"
        )


def _score_and_keep(cache, model, ids: torch.Tensor, mask: torch.Tensor, prompt: torch.Tensor, first: int) -> None:
    with cache.scoring_reconstructions():
        for step_ids, step_mask, step_positions in reconstruction_steps(
            ids, mask, prompt, cache.policy.chunk_size, first
        ):
            _forward(model, cache, step_ids, torch.cat([mask, step_mask], dim=1), step_positions)
            cache.forget_newest(step_ids.shape[1])
    cache.keep_reconstructed()


def _forward(model, cache, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> None:
    model(ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1, **{CACHE_KWARG: cache})


def reconstruction_steps(ids: torch.Tensor, mask: torch.Tensor, prompt: torch.Tensor, chunk_size: int, first: int = 0):
    """The scoring forwards of a left-padded context: yields `(ids, mask, positions)`, each [batch, width].

    Step k holds, for each row, `prompt` + the row's real tokens `first + k * chunk_size - ANCHOR_TOKENS` (from
    0) to `first + (k + 1) * chunk_size`, left-padded to the step's widest row, at positions following the
    row's real tokens; a row whose context ended before step k is all padding. Chunks count each row's own
    tokens, so a row gets the same forwards in a batch as alone.
    """
    rows = [row[real.bool()] for row, real in zip(ids, mask)]
    for start in range(first, max(len(row) for row in rows), chunk_size):
        pieces = [
            torch.cat([prompt, row[max(0, start - ANCHOR_TOKENS) : start + chunk_size]])
            if start < len(row)
            else row[:0]
            for row in rows
        ]
        width = max(len(piece) for piece in pieces)
        step_ids = ids.new_zeros((len(rows), width))
        step_mask, step_positions = torch.zeros_like(step_ids), torch.ones_like(step_ids)
        for index, (row, piece) in enumerate(zip(rows, pieces)):
            step_ids[index, width - len(piece) :] = piece
            step_mask[index, width - len(piece) :] = 1
            step_positions[index, width - len(piece) :] = torch.arange(len(row), len(row) + len(piece))
        yield step_ids, step_mask, step_positions
