"""Decode attention that reads a KIVI-quantized cache's codes directly, without re-materializing the cache.

A `QuantizedCache` layer holds older tokens as packed codes (`caches/storage.py`, `QuantizedStore`): keys
per channel over blocks of G tokens (`k_rot[t, c] = min[b, c] + code[t, c] * scale[b, c]` for the block
`b` of token `t`), values per token over groups of channels, both after an optional orthonormal rotation
R of the channels (`k_rot = k R`). For a query q the logit of a quantized key is

    q . k = (q R) . k_rot = sum_c ((q R)_c * scale[b, c]) * code[t, c] + (q R) . min[b]

so the rotation, the scales and the minimums fold into the query once per block, and the codes are only
unpacked inside the reduction. The values' output is `sum_t p_t (min[t, g] + code[t, c] * scale[t, g])`,
un-rotated once with R^T. Sinks (the layer's full-precision head), the full-precision residual, a key
block cut short by `crop`, and the new tokens join the same softmax exactly (one softmax over all parts,
in float32), with GQA, the layer's `scaling`, `softcap` and learned sink logits.

How the path is switched on (no user flag): a `QuantizedCache(..., attention="codes"|"auto")` layer's
`update`, for a short query (at most `MAX_QUERY_LENGTH` tokens), appends the new tokens and returns
*placeholder* tensors of the usual shapes (zero-stride, no memory), the keys carrying a `CodeRoute` to a
snapshot of what the dequantize path would have returned. The routed `sdpa` entry (`hf_kvcache.attention.routing`)
serves it by computing attention from the codes; any other call runs the original function unchanged. A layer
only returns placeholders when this is certain to reach that entry:

- the mask function records in the cache's `ForwardContext` which attention implementation the model's config
  names for this forward: only `sdpa` goes through the interface (models call their own
  `eager_attention_forward` directly for `eager`; score capture calls the sdpa function directly), so for
  anything else the layer returns real tensors;
- a layer first returns real keys carrying a `ProbeRoute` (the prefill): only if exactly they reach the entry
  is the layer's model known to pass them unchanged. A model that transforms keys after the cache update
  (latent attention), or whose attention bypasses the interface (Falcon), never reads codes.

Packed codes are unpacked per bit plane (`(word >> shift) & mask`, channels `i * P + j`), vectorized.
`torch.compile` (inductor, CPU or GPU) fuses the unpacking into the two reductions (logits and values)
so no float copy of the codes is written; sizes along tokens are dynamic, so one compilation serves a
whole generation. When compilation fails, one warning is given and the eager version (same numbers up
to float32 rounding, matrix products instead of fused reductions) is used from then on.

Source: KIVI, Liu et al. 2024, https://arxiv.org/abs/2402.02750.
"""

import types
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch

from hf_kvcache.attention import routing
from hf_kvcache.attention.probabilities import allowed_keys, attention_probabilities
from hf_kvcache.caches.storage import QuantizedStore

MAX_QUERY_LENGTH = 8  # queries up to this length (decode, small speculative chunks) read codes


class CodeAttentionError(RuntimeError):
    """A placeholder returned by a code-reading cache layer reached something other than the attention."""


@dataclass
class CodeView:
    """What the dequantize path's `update` would have returned, without materializing it: the head
    (sinks), a snapshot of the quantized store before the append, and the new tokens.

    Shapes: head and new keys/values [batch, kv_heads, tokens, channels] in the model's dtype.
    """

    head_keys: torch.Tensor
    head_values: torch.Tensor
    store: QuantizedStore
    new_keys: torch.Tensor
    new_values: torch.Tensor
    learned_sinks: bool
    compiled: bool = True

    def materialize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Full-precision keys and values, exactly as `KVLayer.update` returns them."""
        body_keys, body_values = zip(*self.store.parts())
        keys = torch.cat([self.head_keys, *body_keys, self.new_keys], dim=-2)
        values = torch.cat([self.head_values, *body_values, self.new_values], dim=-2)
        return keys, values


# --- bit planes ------------------------------------------------------------------------------------
def code_words(codes: torch.Tensor, bits: int) -> tuple[torch.Tensor, int]:
    """Packed codes [..., packed] as words holding `per_word` codes each: bytes for 2/4/8 bits, 24-bit
    int32 words (three bytes) for 3 bits. Word `i` holds channels `i * per_word + j`, j < per_word."""
    if bits == 3:
        triples = codes.view(*codes.shape[:-1], -1, 3).to(torch.int32)
        return triples[..., 0] | (triples[..., 1] << 8) | (triples[..., 2] << 16), 8
    return codes, 8 // bits


def code_plane(words: torch.Tensor, bits: int, plane: int) -> torch.Tensor:
    """Codes of channels `i * per_word + plane` as float32, one per word."""
    return ((words >> (plane * bits)) & ((1 << bits) - 1)).to(torch.float32)


def plane_aligned(bits: int, group: int) -> bool:
    """Whether value groups of `group` channels hold whole words (needed to read value codes per plane)."""
    return group % (8 if bits == 3 else 8 // bits) == 0


# --- the two reductions over codes ----------------------------------------------------------------------
def key_logits(
    queries: torch.Tensor,
    codes: torch.Tensor,
    scale: torch.Tensor,
    minimum: torch.Tensor,
    bits: int,
    block: int,
    fused: bool,
) -> torch.Tensor:
    """Logits of rotated, scaled queries against whole blocks of per-channel quantized keys.

    queries [B, H, M, D] float32 (already rotated and scaled); codes [B, H, n * block, packed] uint8;
    scale, minimum [B, H, n, D] -> [B, H, M, n * block] float32. `fused`: broadcast-and-sum (what
    inductor fuses with the unpacking) instead of matrix products (eager).
    """
    batch, heads, rows, _ = queries.shape
    blocks = scale.shape[2]
    words, per_word = code_words(codes, bits)
    width = words.shape[-1]
    folded = queries[:, :, None] * scale[:, :, :, None].float()  # [B, H, n, M, D]
    bias = (queries[:, :, None] * minimum[:, :, :, None].float()).sum(-1)  # [B, H, n, M]
    planes = folded.view(batch, heads, blocks, rows, width, per_word).transpose(-1, -2)  # [.., M, P, W]
    words = words.view(batch, heads, blocks, block, width)
    logits = bias[..., None]  # [B, H, n, M, block] after the sum
    for plane in range(per_word):
        plane_codes = code_plane(words, bits, plane)  # [B, H, n, block, W]
        if fused:
            logits = logits + (plane_codes[:, :, :, None] * planes[:, :, :, :, None, plane]).sum(-1)
        else:
            logits = logits + planes[:, :, :, :, plane] @ plane_codes.transpose(-1, -2)
    return logits.permute(0, 1, 3, 2, 4).reshape(batch, heads, rows, blocks * block)


def value_output(
    probabilities: torch.Tensor,
    codes: torch.Tensor,
    scale: torch.Tensor,
    minimum: torch.Tensor,
    bits: int,
    group: int,
    fused: bool,
) -> torch.Tensor:
    """Attention-weighted sum of per-token quantized values, in the rotated channel basis.

    probabilities [B, H, M, T] float32; codes [B, H, T, packed] uint8; scale, minimum [B, H, T, groups]
    -> [B, H, M, D] float32, D = groups * group. Needs `plane_aligned(bits, group)`.
    """
    batch, heads, rows, tokens = probabilities.shape
    groups = scale.shape[-1]
    words, per_word = code_words(codes, bits)
    words = words.view(batch, heads, tokens, groups, group // per_word)
    weighted = probabilities[..., None] * scale[:, :, None].float()  # [B, H, M, T, groups]
    base = probabilities @ minimum.float()  # [B, H, M, groups]
    planes = []
    for plane in range(per_word):
        plane_codes = code_plane(words, bits, plane)  # [B, H, T, groups, W]
        if fused:
            planes.append((weighted[..., None] * plane_codes[:, :, None]).sum(3))
        else:
            planes.append(torch.einsum("bhmtg,bhtgw->bhmgw", weighted, plane_codes))
    output = torch.stack(planes, dim=-1).reshape(batch, heads, rows, groups, group) + base[..., None]
    return output.reshape(batch, heads, rows, groups * group)


# One compiled function per (reduction, bits, group), each on its own code object: dynamo counts a code
# object's specializations against `recompile_limit`, and a bit profile that mixes widths across layers (with
# beam search changing the batch) would soon exceed it and run eagerly from then on.
_compiled: dict[tuple[str, int, int], Callable] = {}


def _own_code(function: Callable, bits: int, group: int) -> Callable:
    """`function` on a copy of its code object, named for the widths it will be compiled for."""
    code = function.__code__.replace(co_name=f"{function.__name__}_{bits}bits_{group}")
    return types.FunctionType(code, function.__globals__, code.co_name, function.__defaults__, function.__closure__)


_compile_failed = False
# Argument positions and dimensions that grow with the cache: marked dynamic, so one graph serves all sizes.
_GROWING = {"key_logits": ((1, 2), (2, 2), (3, 2)), "value_output": ((0, 3), (1, 2), (2, 2), (3, 2))}


def _run(function: Callable, compiled: bool, *args) -> torch.Tensor:
    """`function` compiled with inductor (token sizes dynamic) or, if not `compiled` or compilation
    failed once (warned once), eagerly with matrix products."""
    global _compile_failed
    if compiled and not _compile_failed:
        key = (function.__name__, *args[-2:])  # the last two arguments are the bits and the group size
        if key not in _compiled:
            _compiled[key] = torch.compile(_own_code(function, *args[-2:]), dynamic=False)
        for position, dim in _GROWING[function.__name__]:
            torch._dynamo.maybe_mark_dynamic(args[position], dim)
        try:
            return _compiled[key](*args, True)
        except Exception as error:  # inductor needs a working C++ compiler (CPU) or Triton (GPU)
            _compile_failed = True
            warnings.warn(
                f"hf_kvcache: torch.compile of the code-reading attention failed ({type(error).__name__}: "
                f"{error}); using the eager version from now on (same results, slower)",
                RuntimeWarning,
                stacklevel=3,
            )
    return function(*args, False)


# --- attention over every part of the cache ---------------------------------------------------------------
def code_attention(
    query: torch.Tensor,
    view: CodeView,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    compiled: bool = True,
) -> torch.Tensor:
    """Attention of `query` over the tokens `view` stands for, reading the quantized blocks as codes.

    query [B, q_heads, L, D]; attention_mask None (causal), boolean (True: attend) or additive float,
    [B or 1, 1, L, >= kv]; `sinks` learned per-query-head logits [q_heads] that join the softmax without
    a value. Returns [B, L, q_heads, Dv] in the query's dtype, as `sdpa_attention_forward` does.

    Raises:
        ValueError: the store's key blocks are cut short anywhere but at the newest block
            (`QuantizedStore.whole_blocks()` is None); attend `CodeView.materialize()` instead.
    """
    store = view.store
    whole = store.whole_blocks()
    if whole is None:
        raise ValueError("key blocks cut short in the middle cannot be read as codes; use CodeView.materialize")
    batch, q_heads, length, channels = query.shape
    heads = view.new_keys.shape[1]
    group = q_heads // heads
    scaling = channels**-0.5 if scaling is None else scaling
    rows = (query.float() * scaling).reshape(batch, heads, group * length, channels)
    quantized = whole * store.key_group
    tail_keys, tail_values = store.dequantized_tokens(quantized)  # a short newest block, in full precision
    post_keys = torch.cat([tail_keys, store.residual_keys, view.new_keys], dim=-2).float()
    post_values = torch.cat([tail_values, store.residual_values, view.new_values], dim=-2).float()
    head_keys, head_values = view.head_keys.float(), view.head_values.float()
    parts = [rows @ head_keys.mT]
    if quantized:
        rotated = rows if store.key_rotation is None else rows @ store.key_rotation.float()
        key_args = (store.key_codes[:, :, :quantized], store.key_scale[:, :, :whole], store.key_min[:, :, :whole])
        parts.append(_run(key_logits, compiled, rotated, *key_args, store.key_bits, store.key_group))
    parts.append(rows @ post_keys.mT)
    logits = torch.cat(parts, dim=-1)  # [B, H, group * L, kv]
    kv = logits.shape[-1]
    allowed = (
        None
        if attention_mask is None and length == 1
        else allowed_keys(attention_mask, slice(0, length), length, kv, query.device)
    )
    probabilities = attention_probabilities(logits.view(batch, heads, group, length, kv), allowed, softcap, sinks)
    probabilities = probabilities.view(batch, heads, group * length, kv)
    head_count, post_count = head_keys.shape[2], post_keys.shape[2]
    output = probabilities[..., :head_count] @ head_values
    output = output + probabilities[..., head_count + quantized : head_count + quantized + post_count] @ post_values
    if quantized:
        value_args = (store.value_codes[:, :, :quantized], store.value_scale[:, :, :quantized])
        body = _run(
            value_output,
            compiled,
            probabilities[..., head_count : head_count + quantized].contiguous(),
            *value_args,
            store.value_min[:, :, :quantized],
            store.value_bits,
            store.value_group,
        )
        output = output + (body if store.value_rotation is None else body @ store.value_rotation.float().mT)
    output = output.view(batch, heads, group, length, -1).reshape(batch, q_heads, length, -1)
    return output.transpose(1, 2).contiguous().to(query.dtype)


# --- routes from the cache update to the attention call --------------------------------------------------
class CodeRoute(routing.Route):
    """Placeholders a code-reading layer returned: the routed `sdpa` attends the codes of `view` instead."""

    entry = routing.SDPA

    def __init__(self, view: CodeView):
        self.view = view

    def attend(self, attention: Callable, module, query, key, value, attention_mask, **kwargs):
        view, self.view = self.view, None  # hold no snapshot beyond its attention call
        readable = (
            view.store.whole_blocks() is not None
            and not kwargs.get("dropout")
            and kwargs.get("position_bias") is None
            and (kwargs.get("is_causal", True) or query.shape[2] == 1)
        )
        if not readable:  # what code attention does not implement: attend the materialized cache
            return attention(module, query, *view.materialize(), attention_mask, **kwargs)
        sinks = module.sinks if view.learned_sinks else None
        output = code_attention(
            query, view, attention_mask, kwargs.get("scaling"), kwargs.get("softcap"), sinks, compiled=view.compiled
        )
        return output, None

    def unread_error(self) -> Exception:
        return CodeAttentionError(
            "a QuantizedCache layer returned placeholders for a code-reading attention, but the model's "
            "attention never read them. Build the cache with attention='dequantize' for this model."
        )


class ProbeRoute(routing.Route):
    """Real keys a code-reading layer returned before it knew its model: if exactly they reach the routed
    `sdpa`, the model passes the cache's tensors to attention unchanged (`layer.attention_confirmed`)."""

    entry = routing.SDPA

    def __init__(self, layer: object):
        self.layer = weakref.ref(layer)

    def attend(self, attention: Callable, module, query, key, value, attention_mask, **kwargs):
        if (layer := self.layer()) is not None:
            layer.attention_confirmed = True
        return attention(module, query, key, value, attention_mask, **kwargs)


def placeholders(view: CodeView) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-stride tensors shaped like the keys and values the dequantize path returns, the keys carrying a
    `CodeRoute` to `view`."""
    kv = view.head_keys.shape[2] + len(view.store) + view.new_keys.shape[2]
    shapes = [(*tensor.shape[:2], kv, tensor.shape[3]) for tensor in (view.new_keys, view.new_values)]
    keys, values = (view.new_keys.new_zeros(()).expand(shape) for shape in shapes)
    return routing.tag(keys, CodeRoute(view)), values
