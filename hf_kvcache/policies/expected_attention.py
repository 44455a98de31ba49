"""Expected Attention: keep the keys that the next queries, modelled as Gaussian, are expected to attend most."""

from dataclasses import dataclass

import torch

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
from hf_kvcache.validation import check_int

# Bounds of the fields: the averaged rotations take n_future_positions x rotary_dim / 2 float64 values at every
# scoring (128K positions: 64 MiB at head size 128), and the query window is held in every layer.
MAX_FUTURE_POSITIONS = 131072
MAX_QUERY_WINDOW = 4096


@register_policy("expected-attention", "Expected Attention: keys future queries (Gaussian) are expected to attend")
@dataclass(frozen=True)
class ExpectedAttention(EvictionPolicy):
    """Models each query head's next `n_future_positions` queries as one Gaussian estimated from its last
    `query_window` real queries, and keeps the tokens with the highest expected attention, in prefill and
    decoding (every forward that leaves more than `budget` tokens), plus the `recent` newest tokens and each
    row's first `sink_tokens` real tokens.

    Queries are un-rotated to before RoPE (each by the position it was seen at), giving per query head a mean
    `mu` [head_dim] and covariance `Sigma` [head_dim, head_dim]; both are rotated by the average RoPE rotation
    `R` of the future positions `seen .. seen + n_future_positions - 1` (`R mu`, `R Sigma R^T`). For a Gaussian
    query the expected logit exponential of key `k` is closed form,
    `E[exp(q.k / sqrt(d))] = exp(mu.k / sqrt(d) + k^T Sigma k / (2 d))` (d = head_dim); normalized over the
    stored real keys it is each query head's expected attention, averaged over the query heads of a KV head.
    Positions count the layer's stored tokens (padding included): a row's constant offset between them and
    the model's RoPE positions cancels between un-rotation and future rotation.

    As in the paper, each token's expected attention is weighted by the norm of its value. The logit scale
    is the model's (`step.scaling`: `s` in `exp(s mu.k + s^2 k^T Sigma k / 2)`); logit softcapping (Gemma 2)
    is not modelled. Layers without RoPE (`positions` "none" or "absolute") need no rotation; layers whose
    RoPE cannot be shifted (`geometry.rope` None) are scored from their post-RoPE query statistics without
    rotation averaging (an approximation). A layer whose cached keys are not the keys the queries meet (a
    latent MLA cache) is refused at cache construction.

    Source: Devoto et al. 2025, "Expected Attention: KV Cache Compression by Estimating Attention from Future
    Queries Distribution", https://arxiv.org/abs/2510.00636.

    Args:
        budget: tokens kept per layer and KV head.
        per_head: each KV head keeps its own tokens (True) or all keep the same tokens, ranked by the expected
            attention averaged over the layer's KV heads (False).
        query_window: the newest real queries whose statistics model the future queries (32, like SnapKV's
            observation window: the buffer is held in every layer and counts in the bytes); held, before
            RoPE, in `step.running` ("queries" [batch, q_heads, <= query_window, head_dim] in the queries' dtype,
            "queries_real" bool [batch, <= query_window]).
            At most `MAX_QUERY_WINDOW` (4096): the window's query vectors (all query heads) are held in
            every layer beside the kept keys, and every scoring reads them all.
        n_future_positions: future positions whose RoPE rotations are averaged (kvpress's default, 512); at
            most `MAX_FUTURE_POSITIONS` (131072, a 128K-token continuation), since every scoring builds their
            rotation angles.
        recent: newest tokens always kept (kvpress's ExpectedAttentionPress scores them like the others; here
            they are kept, as H2O keeps its recent tokens).
        sink_tokens: each row's first real tokens always kept (kvpress's `n_sink`, 4); recent + sink_tokens must
            not exceed budget.

    Raises:
        ValueError: a parameter out of range (named); at cache construction, a layer whose cached keys are not
            what its queries meet (named).
    """

    query_window: int = 32
    n_future_positions: int = 512
    recent: int = 4
    sink_tokens: int = 4
    needs = Needs.QUERY_STATES

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("query_window", self.query_window, 1, MAX_QUERY_WINDOW, hint="the query statistics' window")
        check_int(
            "n_future_positions",
            self.n_future_positions,
            1,
            MAX_FUTURE_POSITIONS,
            hint="future positions whose rotations are averaged; each scoring builds all of them",
        )
        self.check_within_budget(recent=self.recent, sink_tokens=self.sink_tokens)
        if self.recent + self.sink_tokens > self.budget:
            raise ValueError(
                f"recent={self.recent} + sink_tokens={self.sink_tokens} = {self.recent + self.sink_tokens} exceeds "
                f"budget={self.budget}: ExpectedAttention keeps both within its budget; pass smaller ones or a larger "
                "budget"
            )

    def scored_queries(self, query_length: int) -> int:
        return min(self.query_window, query_length)

    def check_layer(self, geometry: LayerGeometry) -> None:
        check_keys_meet_queries(self, geometry)

    def update_state(self, step: Step) -> None:
        """Append this forward's queries (un-rotated to before RoPE, padding marked) to the query window."""
        queries, geometry = step.queries, step.geometry
        check_keys_meet_queries(self, geometry, queries.shape[-1])
        count = queries.shape[2]
        if geometry.rope is not None:
            seen_at = torch.arange(step.seen - count, step.seen, dtype=torch.float64, device=queries.device)
            angles = seen_at[:, None] * geometry.rope.inv_freq.to(queries.device)  # [count, rotary_dim / 2]
            queries = geometry.rope.rotate(queries, angles.cos(), -angles.sin())
        extend_window(step.running, self.query_window, queries=queries, queries_real=step.real[:, 0, -count:])

    def score(self, step: Step) -> torch.Tensor:
        """Expected attention probability [batch, kv_heads, stored] of every stored token (0 for padding)."""
        queries = step.running["queries"].float()
        weights = step.running["queries_real"].float()[:, None, :, None]  # padding queries count zero
        mean = (weights * queries).sum(2) / weights.sum(2).clamp(min=1)  # [batch, q_heads, head_dim]
        centred = (queries - mean[:, :, None]) * weights
        covariance = centred.transpose(-1, -2) @ centred / weights.sum(2, keepdim=True).clamp(min=1)
        rope = step.geometry.rope
        if rope is not None:
            future = torch.arange(self.n_future_positions, dtype=torch.float64, device=queries.device) + step.seen
            angles = future[:, None] * rope.inv_freq.to(queries.device)  # [n_future_positions, rotary_dim / 2]
            cos, sin = angles.cos().mean(0), angles.sin().mean(0)
            mean = rope.rotate(mean, cos, sin)
            covariance = rope.rotate(rope.rotate(covariance, cos, sin).transpose(-1, -2), cos, sin)
        keys = step.keys.float()
        kv_heads, dim = keys.shape[1], keys.shape[-1]
        scale = step.scaling if step.scaling is not None else dim**-0.5
        mean = mean.unflatten(1, (kv_heads, -1))  # [batch, kv_heads, group, head_dim]
        covariance = covariance.unflatten(1, (kv_heads, -1))  # [batch, kv_heads, group, head_dim, head_dim]
        linear = scale * mean @ keys.transpose(-1, -2)  # [batch, kv_heads, group, stored]
        quadratic = scale**2 / 2 * ((keys[:, :, None] @ covariance) * keys[:, :, None]).sum(-1)
        logits = (linear + quadratic).masked_fill(~step.real[:, :, None], float("-inf"))
        return logits.softmax(dim=-1).mean(dim=2) * step.values.float().norm(dim=-1)

    def select(self, step: Step, budget: int) -> torch.Tensor:
        return keep_top(step, self.score(step), budget, self.per_head, self.recent, self.sink_tokens)
