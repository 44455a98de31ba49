"""KVzip: compress a context once, query-agnostically, by how much attention its tokens receive while the model
reconstructs it; the compressed cache then serves many questions (each on its own `cache.clone()`).

Compression (`EvictionCache.compress_context`, the protocol of `hf_kvcache.caches.compress_once`):

1. prefill: the context goes into the empty cache in forwards of `chunk_size` tokens; nothing is evicted;
2. reconstruction: per chunk of `chunk_size` context tokens, one forward of the reconstruction prompt
   ("Repeat the previous context exactly.") followed by that chunk again (preceded by the last
   `ANCHOR_TOKENS` tokens of the chunk before it), through the cache holding the whole context. Each layer
   records, per context token and KV head, the highest softmax attention any of these queries (any query
   head of the group sharing the KV head) gives it (`max_attention`), then the reconstruction tokens are
   forgotten: the cache again holds the context alone, and its seen length is the context length;
3. selection: every KV head of every layer keeps its `budget` context tokens with the highest recorded
   attention, plus each row's first `sink_tokens` tokens.

Questions then run as ordinary forwards, which never evict: the cache grows, as in the paper. A text read in
chunks (`hf-kvcache eval`'s perplexity pass) is compressed after each chunk, by reconstructing that chunk
(`compress_once.compress_newest`).

Source: Kim et al. 2025, "KVzip: Query-Agnostic KV Cache Compression with Context Reconstruction",
https://arxiv.org/abs/2505.23416. Differences from the authors' code: a uniform budget per KV head (the
paper's headline setting ranks all heads and layers together); no chat-template postfix after the prompt
(put one in `prompt` or pass the ids yourself); the same prompt for every chunk; the attention is the model's
own softmax over everything the reconstruction queries attend, and every chunk's queries score the whole
context (the authors' code normalizes over the chunk being repeated and scores that chunk only).
"""

import functools
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from hf_kvcache.attention.probabilities import allowed_keys, attention_probabilities, grouped_logits
from hf_kvcache.policies.base import CompressOncePolicy, Step, keep_top, register_policy
from hf_kvcache.scoring import QUERY_CHUNK, AttentionCall
from hf_kvcache.validation import check_int

DEFAULT_PROMPT = "\n\nRepeat the previous context exactly."


@register_policy("kvzip", "KVzip: compress a context once by reconstruction attention; questions never evict")
@dataclass(frozen=True)
class KVzip(CompressOncePolicy):
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

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_within_budget(sink_tokens=self.sink_tokens)
        check_int("chunk_size", self.chunk_size, minimum=1)
        if not isinstance(self.prompt, str):
            raise ValueError(f"prompt={self.prompt!r} must be a string ('' for no instruction)")

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


def max_attention(call: AttentionCall, context: int, heads: int) -> torch.Tensor:
    """float32 [batch, heads, context]: the highest softmax attention any real query of `call` gives each of
    the first `context` keys, over the query heads of each of `heads` cached heads (query heads are grouped
    in order; `heads` divides their number).

    The probabilities are the model's own (its mask, `scaling`, `softcap`, learned `sinks`), normalized over
    every key the query attends; padding queries (`call.real_queries` False) count zero. Queries are scored
    `QUERY_CHUNK` at a time, so the whole attention matrix is never held.
    """
    query, key = call.query, call.key
    batch, q_heads, q_length, _ = query.shape
    kv_heads, kv_length = key.shape[1], key.shape[2]
    best = query.new_zeros((batch, kv_heads, q_heads // kv_heads, context), dtype=torch.float32)
    for start in range(0, q_length, QUERY_CHUNK):
        rows = slice(start, min(start + QUERY_CHUNK, q_length))
        allowed = allowed_keys(call.attention_mask, rows, q_length, kv_length, query.device)
        real = None if call.real_queries is None else call.real_queries[:, rows]
        logits = grouped_logits(query, key, rows, call.scaling)
        probabilities = attention_probabilities(logits, allowed, call.softcap, call.sinks, real)
        best = torch.maximum(best, probabilities[..., :context].amax(dim=-2))
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
