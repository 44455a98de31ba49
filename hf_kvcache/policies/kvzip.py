"""KVzip: compress a context once, query-agnostically, by how much attention its tokens receive while the model
reconstructs it; the compressed cache then serves many questions (each on its own `cache.clone()`).

Compression (`EvictionCache.compress_context`, which calls `KVzip.compress_context`):

1. prefill: the context goes into the empty cache in forwards of `chunk_size` tokens; nothing is evicted;
2. reconstruction: per chunk of `chunk_size` context tokens, one forward of the reconstruction prompt
   ("Repeat the previous context exactly.") followed by that chunk again (preceded by the last
   `ANCHOR_TOKENS` tokens of the chunk before it), through the cache holding the whole context. Each layer
   records, per context token and KV head, the highest softmax attention any of these queries (any query
   head of the group sharing the KV head) gives it (`max_attention`), then the reconstruction tokens are
   forgotten: the cache again holds the context alone, and its seen length is the context length;
3. selection: every KV head of every layer keeps its `budget` context tokens with the highest recorded
   attention, plus each row's first `sink_tokens` tokens.

Questions then run as ordinary forwards, which never evict: the cache grows, as in the paper.

Source: Kim et al. 2025, "KVzip: Query-Agnostic KV Cache Compression with Context Reconstruction",
https://arxiv.org/abs/2505.23416. Differences from the authors' code: a uniform budget per KV head (the
paper's headline setting ranks all heads and layers together); no chat-template postfix after the prompt
(put one in `prompt` or pass the ids yourself); the same prompt for every chunk; the attention is the model's
own softmax over everything the reconstruction queries attend, and every chunk's queries score the whole
context (the authors' code normalizes over the chunk being repeated and scores that chunk only).
"""

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from hf_kvcache.compat import CACHE_KWARG
from hf_kvcache.policies.base import EvictionPolicy, Step, keep_top, register_policy
from hf_kvcache.scoring import CAPTURE_PREFIX, QUERY_CHUNK, AttentionCall, ScoreCaptureError, _allowed
from hf_kvcache.validation import check_int

if TYPE_CHECKING:
    from hf_kvcache.caches.evicting import EvictionCache

DEFAULT_PROMPT = "\n\nRepeat the previous context exactly."
ANCHOR_TOKENS = 8  # context tokens before a chunk, repeated after the prompt so that the model knows where to resume
RECONSTRUCTION_SCORES = "reconstruction"  # per-token state: the scores recorded so far, while compressing


@register_policy("kvzip", "KVzip: compress a context once by reconstruction attention; questions never evict")
@dataclass(frozen=True)
class KVzip(EvictionPolicy):
    """Query-agnostic compression of a context, once, by its reconstruction attention (see the module docstring).

    The context must go through `cache.compress_context(model, context_ids)` (`compress_once` tells tools so);
    ordinary forwards never evict, so a context fed as a plain prompt is kept whole.

    Args:
        budget: context tokens kept per layer and KV head.
        per_head: each KV head keeps its own tokens (True, KVzip) or all heads keep the same tokens, ranked by
            their scores averaged over heads (False).
        sink_tokens: each row's first real tokens, always kept (KVzip never evicts the system prompt: set it
            to the system prompt's length); part of the budget.
        chunk_size: context tokens per prefill and per reconstruction forward: the reconstruction's attention
            costs about batch x query heads x (chunk_size + prompt) x context floats (scored `QUERY_CHUNK`
            queries at a time).
        prompt: the reconstruction instruction, tokenized with the model's tokenizer (without special tokens);
            "" reconstructs without an instruction.

    Raises:
        ValueError: a field out of range (named).
    """

    sink_tokens: int = 0
    chunk_size: int = 2048
    prompt: str = DEFAULT_PROMPT
    compress_once: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_within_budget(sink_tokens=self.sink_tokens)
        check_int("chunk_size", self.chunk_size, minimum=1)
        if not isinstance(self.prompt, str):
            raise ValueError(f"prompt={self.prompt!r} must be a string ('' for no instruction)")

    def should_evict(self, query_length: int, stored: int, layer_budget: int) -> bool:
        """Never during ordinary forwards: only `compress_context` selects."""
        return False

    def score(self, step: Step) -> torch.Tensor:
        """The highest reconstruction attention each stored token received [batch, kv_heads, stored]."""
        return step.state[RECONSTRUCTION_SCORES]

    def select(self, step: Step, budget: int) -> torch.Tensor:
        return keep_top(step, self.score(step), budget, self.per_head, sink_tokens=self.sink_tokens)

    def reconstruction_scores(self, call: AttentionCall, held: int, heads: int) -> torch.Tensor:
        """float32 [batch, heads, held]: what one reconstruction forward gives each of the `held` context
        tokens (`max_attention`); layers keep the maximum over forwards."""
        return max_attention(call, held, heads)

    def prompt_ids(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None = None) -> list[int]:
        """The token ids of `prompt`, tokenized by `tokenizer` (None: the tokenizer saved with the model, read
        from `model.name_or_path`, local files only).

        Raises:
            ValueError: a non-empty prompt, no tokenizer given and none saved with the model.
        """
        if not self.prompt:
            return []
        tokenizer = tokenizer or _saved_tokenizer(model.name_or_path)
        if tokenizer is None:
            raise ValueError(
                f"KVzip needs a tokenizer for its reconstruction prompt {self.prompt!r}, and none is saved with "
                f"the model (name_or_path={model.name_or_path!r}): pass tokenizer=, or use prompt='' to "
                "reconstruct without an instruction"
            )
        return tokenizer.encode(self.prompt, add_special_tokens=False)

    @torch.no_grad()
    def compress_context(
        self,
        cache: "EvictionCache",
        model: PreTrainedModel,
        context_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
    ) -> None:
        """Prefill `context_ids` [batch, length] (left padding marked 0 in `attention_mask` [batch, length])
        into the empty `cache`, score it by reconstruction and keep each head's best `budget` tokens.

        Positions count each row's real tokens from 0, as `generate` does, so a row keeps the same tokens in a
        padded batch as alone. Afterwards `cache.get_seq_length()` is `length`: feed the questions from there.

        Raises:
            ScoreCaptureError: the model's score capture is off (`hf_kvcache.enable_score_capture(model)`).
            ValueError: a non-empty cache, a row without real tokens, shapes that disagree, or a prompt that
                needs a tokenizer (see `prompt_ids`).
        """
        if not model.config._attn_implementation.startswith(CAPTURE_PREFIX):
            raise ScoreCaptureError(
                "KVzip scores the reconstruction's attention: call `hf_kvcache.enable_score_capture(model)` first"
            )
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
        prompt = torch.tensor(self.prompt_ids(model, tokenizer), dtype=ids.dtype, device=ids.device)
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
        for start in range(0, ids.shape[1], self.chunk_size):
            end = start + self.chunk_size
            _forward(model, cache, ids[:, start:end], mask[:, :end], positions[:, start:end])
        with cache.scoring_reconstructions():
            for step_ids, step_mask, step_positions in reconstruction_steps(ids, mask, prompt, self.chunk_size):
                _forward(model, cache, step_ids, torch.cat([mask, step_mask], dim=1), step_positions)
                cache.forget_newest(step_ids.shape[1])
        cache.keep_reconstructed()


def _forward(model, cache, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> None:
    model(ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1, **{CACHE_KWARG: cache})


def reconstruction_steps(ids: torch.Tensor, mask: torch.Tensor, prompt: torch.Tensor, chunk_size: int):
    """The reconstruction forwards of a left-padded context: yields `(ids, mask, positions)`, each [batch, width].

    Step k holds, for each row, `prompt` + the row's real tokens `k * chunk_size - ANCHOR_TOKENS` (from 0) to
    `(k + 1) * chunk_size`, left-padded to the step's widest row, at positions following the row's real
    tokens; a row whose context ended before step k is all padding. Chunks count each row's own tokens, so a
    row gets the same forwards in a batch as alone.
    """
    rows = [row[real.bool()] for row, real in zip(ids, mask)]
    for start in range(0, max(len(row) for row in rows), chunk_size):
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


def max_attention(call: AttentionCall, context: int, heads: int) -> torch.Tensor:
    """float32 [batch, heads, context]: the highest softmax attention any real query of `call` gives each of
    the first `context` keys, over the query heads of each of `heads` cached heads (query heads are grouped
    in order; `heads` divides their number).

    The probabilities are the model's own (its mask, `scaling`, `softcap`, learned `sinks`), normalized over
    every key the query attends; padding queries (`call.real_queries` False) count zero. Queries are scored
    `QUERY_CHUNK` at a time, so the whole attention matrix is never held.
    """
    query, key = call.query, call.key
    batch, q_heads, q_length, dim = query.shape
    kv_heads, kv_length = key.shape[1], key.shape[2]
    group = q_heads // kv_heads
    scaling = dim**-0.5 if call.scaling is None else call.scaling
    keys = key.float()[:, :, None].transpose(-1, -2)  # [batch, kv_heads, 1, dim, kv]
    best = query.new_zeros((batch, kv_heads, group, context), dtype=torch.float32)
    for start in range(0, q_length, QUERY_CHUNK):
        rows = slice(start, min(start + QUERY_CHUNK, q_length))
        logits = (query[:, :, rows].float().reshape(batch, kv_heads, group, -1, dim) @ keys) * scaling
        if call.softcap is not None:
            logits = torch.tanh(logits / call.softcap) * call.softcap
        allowed = _allowed(call.attention_mask, rows, q_length, kv_length, query.device)
        # One mask for all heads, or one per query head (heads whose stored padding differs).
        allowed = allowed[:, :, None] if allowed.shape[1] == 1 else allowed.unflatten(1, (kv_heads, group))
        logits = logits.masked_fill(~allowed, float("-inf"))
        if call.sinks is not None:
            sink_logits = call.sinks.float().view(1, kv_heads, group, 1, 1).expand(*logits.shape[:-1], 1)
            logits = torch.cat([logits, sink_logits], dim=-1)
        probabilities = logits.softmax(dim=-1)[..., :context].nan_to_num(0.0)  # a query may attend nothing
        if call.real_queries is not None:
            probabilities = probabilities * call.real_queries[:, None, None, rows, None]
        best = torch.maximum(best, probabilities.amax(dim=-2))
    return best.flatten(1, 2).unflatten(1, (heads, -1)).amax(dim=2)


@functools.lru_cache(maxsize=8)
def _saved_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase | None:
    """The tokenizer saved at `name_or_path` (local files only), or None."""
    from transformers import AutoTokenizer

    if not name_or_path:
        return None
    try:
        return AutoTokenizer.from_pretrained(name_or_path, local_files_only=True)
    except (OSError, ValueError):
        return None
