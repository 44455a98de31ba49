"""The model's own attention probabilities, computed once for every part of hf_kvcache that needs them.

Score capture (eviction policies' attention scores), KVzip's reconstruction scores and code-reading decode
all compute attention outside the model's attention function; they use these functions, so that masks
(boolean or additive), softcapping, learned sinks, scaling and GQA grouping are the model's own in each.
"""

import torch


def allowed_keys(mask: torch.Tensor | None, rows: slice, q_length: int, kv_length: int, device) -> torch.Tensor:
    """Boolean [batch|1, 1, rows, kv] of what the queries in `rows` may attend (causal when `mask` is None)."""
    if mask is None:
        query_rows = torch.arange(rows.start, rows.stop, device=device)[:, None] + (kv_length - q_length)
        return (torch.arange(kv_length, device=device)[None, :] <= query_rows)[None, None]
    mask = mask[:, :, rows, :kv_length]
    return mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2


MASKED = torch.finfo(torch.float32).min  # what eager attention's additive mask leaves: a fully masked row stays finite


def attention_probabilities(
    logits: torch.Tensor,
    allowed: torch.Tensor | None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    real_queries: torch.Tensor | None = None,
) -> torch.Tensor:
    """The model's own attention probabilities, as its eager attention computes them: the one softmax of score
    capture, KVzip's reconstruction scores and code-reading decode.

    `logits` float32 [batch, kv_heads, group, rows, kv]: scaled query-key products, query head `h * group + g`
    at [h, g] (GQA). `allowed` bool [batch|1, 1|q_heads, rows, kv], True where a query may attend (None: all).
    `softcap`: tanh capping of the logits before the mask (Gemma 2). `sinks` [q_heads]: learned logits that take
    part in the softmax without a key (GPT-OSS; real tokens' probabilities then sum to less than one).
    `real_queries` bool [batch, rows]: False (padding queries) gives a row of zeros. Forbidden logits are the
    float32 minimum, as eager attention's additive mask leaves them. Returns float32 [batch, kv_heads, group,
    rows, kv].
    """
    batch, kv_heads, group, rows, _ = logits.shape
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    if allowed is not None:
        allowed = allowed.unflatten(1, (kv_heads, group)) if allowed.shape[1] > 1 else allowed[:, :, None]
        logits = logits.masked_fill(~allowed, MASKED)
    if sinks is not None:
        sink_logits = sinks.float().view(1, kv_heads, group, 1, 1).expand(batch, kv_heads, group, rows, 1)
        probabilities = torch.cat([logits, sink_logits], dim=-1).softmax(dim=-1)[..., :-1]
    else:
        probabilities = logits.softmax(dim=-1)
    if real_queries is not None:
        probabilities = probabilities * real_queries[:, None, None, :, None]
    return probabilities


def grouped_logits(query: torch.Tensor, key: torch.Tensor, rows: slice, scaling: float | None) -> torch.Tensor:
    """float32 [batch, kv_heads, group, rows, kv]: scaled logits of the queries in `rows` (query [batch, q_heads, q,
    dim], key [batch, kv_heads, kv, dim]), grouped by the KV head they share."""
    batch, q_heads, _, dim = query.shape
    kv_heads = key.shape[1]
    scaling = dim**-0.5 if scaling is None else scaling
    queries = query[:, :, rows].float().reshape(batch, kv_heads, q_heads // kv_heads, -1, dim)
    return (queries @ key.float()[:, :, None].transpose(-1, -2)) * scaling
