"""R-KV: keep tokens that recent queries attend to and that are not repeated by other kept keys."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hf_kvcache.geometry import LayerGeometry
from hf_kvcache.policies.base import (
    EvictionPolicy,
    Needs,
    Step,
    check_keys_meet_queries,
    extend_window,
    keep_top,
    register_policy,
)
from hf_kvcache.policies.snapkv import check_kernel_size, pool_neighbours
from hf_kvcache.validation import check_int, check_number

MAX_OBSERVATION_WINDOW = 1024  # the window's query vectors are held in every layer; each scoring reads them all


@register_policy("rkv", "R-KV: recent queries' attention minus redundancy with the other keys (long outputs)")
@dataclass(frozen=True)
class RKV(EvictionPolicy):
    """Scores each held token by `importance_weight x importance - (1 - importance_weight) x redundancy` and keeps
    the best `budget`, always with the `observation_window` newest tokens; in prefill and decoding, for long
    generated outputs whose reasoning repeats itself.

    - importance: the attention the last `observation_window` real queries pay each held key, recomputed from the
      queries (held after RoPE in `step.running`) over the keys held now, each query seeing only keys from its
      own position and before; averaged over the window's queries and the query heads of each KV head, then
      max-pooled over `kernel_size` neighbouring held tokens (as SnapKV). Sums to 1 over a row's keys. The
      layer's logit scale is used; logit softcapping and learned sink logits are not (they rarely change the
      order of the largest logits).
    - redundancy: each key's mean cosine similarity with the other real keys of its head, normalized over the
      held tokens by a softmax (sums to 1): a key that many others repeat scores high and is evicted first.

    With `compaction_interval` (the paper compresses every 128 generated tokens) the scoring, quadratic in the
    held tokens, runs once per interval. A layer whose cached keys are not what its queries meet (latent MLA)
    is refused at cache construction.

    Source: Cai et al. 2025, "R-KV: Redundancy-aware KV Cache Compression for Reasoning Models",
    https://arxiv.org/abs/2505.24133.

    Args:
        budget: tokens kept per layer and KV head.
        per_head: each KV head keeps its own tokens (True) or all keep the same tokens, ranked by the score
            averaged over the layer's KV heads (False).
        observation_window: the newest queries whose attention measures importance, and the newest tokens always
            kept (at most `MAX_OBSERVATION_WINDOW`, 1024, and at most the budget); held in `step.running`
            ("queries" [batch, q_heads, <= window, head_dim], "query_positions" int64 and "queries_real" bool
            [batch, <= window]) in every layer, counted in the bytes.
        kernel_size: odd width of the max-pooling of importance over neighbouring held tokens (1: none).
        importance_weight: the weight of importance, in [0, 1]; redundancy weighs `1 - importance_weight`
            (the paper's lambda, 0.1).

    Raises:
        ValueError: a parameter out of range (named, with what is accepted); at cache construction, a latent
            MLA layer (named).
    """

    observation_window: int = 8
    kernel_size: int = 7
    importance_weight: float = 0.1
    needs = Needs.QUERY_STATES

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("observation_window", self.observation_window, 1, MAX_OBSERVATION_WINDOW, hint="queries held")
        self.check_within_budget(observation_window=self.observation_window)
        check_kernel_size(self.kernel_size)
        check_number("importance_weight", self.importance_weight, minimum=0.0, inclusive=True)
        if self.importance_weight > 1:
            raise ValueError(
                f"importance_weight={self.importance_weight!r} must be a number between 0 and 1 (the weight of "
                "importance; redundancy weighs the rest)"
            )

    def scored_queries(self, query_length: int) -> int:
        return min(self.observation_window, query_length)

    def check_layer(self, geometry: LayerGeometry) -> None:
        check_keys_meet_queries(self, geometry)

    def update_state(self, step: Step) -> None:
        """Append this forward's last queries (after RoPE, with their positions and padding) to the window."""
        queries = step.queries
        check_keys_meet_queries(self, step.geometry, queries.shape[-1])
        count = queries.shape[2]
        positions = torch.arange(step.seen - count, step.seen, device=queries.device).expand(queries.shape[0], -1)
        real = step.real[:, 0, -count:]
        extend_window(
            step.running, self.observation_window, queries=queries, query_positions=positions, queries_real=real
        )

    def score(self, step: Step) -> torch.Tensor:
        """float32 [batch, kv_heads, stored]: the combined score of every held token (padding: anything)."""
        weight = self.importance_weight
        return weight * self.importance(step) - (1 - weight) * self.redundancy(step)

    def importance(self, step: Step) -> torch.Tensor:
        """The window's mean attention on every held key, max-pooled [batch, kv_heads, stored]."""
        keys = step.keys.float()
        kv_heads, channels = keys.shape[1], keys.shape[-1]
        queries = step.running["queries"].float().unflatten(1, (kv_heads, -1))  # [batch, kv_heads, group, w, dim]
        scale = step.scaling if step.scaling is not None else channels**-0.5
        logits = scale * queries @ keys[:, :, None].transpose(-1, -2)  # [batch, kv_heads, group, w, stored]
        seen_by = step.positions[:, :, None, :] <= step.running["query_positions"][:, None, :, None]
        visible = (seen_by & step.real[:, :, None, :])[:, :, None]  # [batch, kv_heads, 1, w, stored]
        attention = logits.masked_fill(~visible, float("-inf")).softmax(dim=-1).nan_to_num(0.0)
        weights = step.running["queries_real"].float()[:, None, None, :, None]  # padding queries count zero
        importance = (attention * weights).sum(3) / weights.sum(3).clamp(min=1)  # [batch, kv_heads, group, stored]
        return pool_neighbours(importance.mean(dim=2), self.kernel_size)

    def redundancy(self, step: Step) -> torch.Tensor:
        """Softmax over held tokens of each key's mean cosine similarity with the other real keys of its head."""
        unit = F.normalize(step.keys.float(), dim=-1)
        similarity = unit @ unit.transpose(-1, -2)  # [batch, kv_heads, stored, stored]
        real = step.real
        others = (
            real[..., :, None] & real[..., None, :] & ~torch.eye(real.shape[-1], dtype=torch.bool, device=real.device)
        )
        mean = (similarity * others).sum(-1) / others.sum(-1).clamp(min=1)
        return mean.masked_fill(~real, float("-inf")).softmax(dim=-1).nan_to_num(0.0)

    def select(self, step: Step, budget: int) -> torch.Tensor:
        return keep_top(step, self.score(step), budget, self.per_head, recent=self.observation_window)
