"""The layer of every eviction cache: `PolicyLayer`, one per full-attention layer, keeps what its policy selects.

One eviction hook: a policy layer evicts after its forward's attention ran, when the capturing attention
function (`hf_kvcache.scoring`, switched on by `enable_score_capture(model)`) hands it the attention
call. The layer returns its keys tagged with a score route (`scoring.ScoreRoute`); the attention function
first asks it for the mask (`attention_mask`: the padding of kept tokens, which transformers cannot know once
tokens were evicted out of order), runs the model's own attention, then calls `observe`, which builds the
policy's `Step` and keeps what the policy selects. Every policy goes through this hook, whether it reads attention
(H2O, SnapKV) or only keys (Knorm), so padding is handled once, for all of them.

Left-padded batches: each row keeps its own tokens; padding is never kept in place of a real token
(only as filler when a row has fewer real tokens than the budget) and never attended.
"""

import torch

from hf_kvcache.attention.routing import tag
from hf_kvcache.caches.base import KVLayer, Storage
from hf_kvcache.caches.storage import TensorMap
from hf_kvcache.geometry import LayerGeometry
from hf_kvcache.policies.base import RECONSTRUCTION_SCORES, EvictionPolicy, Needs, Step, selected_indices
from hf_kvcache.scoring import AttentionCall, ScoreRoute, padding_of_new_tokens, with_stored_padding


def refuse_rollback(layer: object) -> None:
    raise ValueError(
        f"{type(layer).__name__} cannot roll back (crop), so it cannot serve assisted or prompt-lookup decoding: "
        "policy-based eviction keeps no record of the tokens it evicted, and which tokens it keeps depends on "
        "the tokens a rollback would remove. Use QuantizedCache, SlidingWindowCache or SinkCache for assisted decoding."
    )


def gather_last(tensor: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """`tensor[b, h, indices[b, h, i]]` for [batch, heads, tokens] tensors; either side may have one head."""
    heads = max(tensor.shape[1], indices.shape[1])
    return tensor.expand(-1, heads, -1).gather(2, indices.expand(-1, heads, -1))


class PolicyLayer(KVLayer):
    """A full-attention layer whose kept tokens are chosen by `policy`, at most `budget` per KV head (plus up to
    `policy.compaction_interval - 1` decoded tokens between compactions).

    Besides the stored keys and values it holds, per stored token and KV head, whether the token is real
    (bool) and the position it was seen at (int32); both count in `memory_bytes`.
    """

    is_croppable = False
    tracks_padding = False  # `real`, per head, replaces the per-row record of KVLayer

    def __init__(self, geometry: LayerGeometry, storage: Storage, policy: EvictionPolicy, budget: int, num_layers: int):
        super().__init__(geometry, storage)
        self.policy, self.budget, self.num_layers = policy, budget, num_layers
        self.query_length = 0
        self.real: torch.Tensor | None = None  # bool [batch, kv_heads, stored]
        self.positions: torch.Tensor | None = None  # int32 [batch, kv_heads, stored]
        self.state: dict[str, torch.Tensor] = {}  # the policy's per-token state, [batch, heads or 1, stored]
        self.running: dict[str, torch.Tensor] = {}  # the policy's other state, batch first

    def get_max_length(self) -> int:
        """The most tokens held between forwards: the budget plus what decoding steps add between compactions."""
        return self.budget + self.policy.compaction_interval - 1

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        self.query_length = key_states.shape[-2]
        return tag(keys, ScoreRoute(self)), values

    def _append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super()._append(key_states, value_states)
        batch, heads, count = key_states.shape[:3]
        new_positions = torch.arange(self.seen_tokens - count, self.seen_tokens, device=key_states.device)
        new_positions = new_positions.to(torch.int32).expand(batch, heads, -1)
        new_real = torch.ones((batch, heads, count), dtype=torch.bool, device=key_states.device)
        if self.real is None:
            self.real, self.positions = new_real, new_positions.clone()
        else:
            self.real = torch.cat([self.real, new_real], dim=-1)
            self.positions = torch.cat([self.positions, new_positions], dim=-1)

    # --- called by the capturing attention function -----------------------------------------------
    def attention_mask(self, attention_mask: torch.Tensor | None, query: torch.Tensor) -> torch.Tensor | None:
        """Record which of this forward's tokens are padding; return the mask with the true padding of
        the stored tokens (see `scoring.with_stored_padding`)."""
        new_real = padding_of_new_tokens(attention_mask, self.query_length)
        if new_real is not None:
            self.real[..., -self.query_length :] = new_real[:, None]
        return with_stored_padding(attention_mask, self.real[..., : -self.query_length], query)

    def observe(self, call: AttentionCall) -> None:
        """Build the policy's `Step` from this forward's attention call, update its state, and evict.

        Raises:
            PolicyOutputError: the policy's selection or scores cannot be kept (duplicate, unordered, out of
                range or too many indices, non-finite scores: `policies.base.selected_indices`), naming it.
        """
        if self.reconstructing:
            self.observe_reconstruction(call)
            return
        policy, stored = self.policy, self.stored_tokens
        evict = policy.should_evict(self.query_length, stored, self.budget)
        attention = queries = None
        count = min(policy.scored_queries(self.query_length), self.query_length)
        if policy.needs is Needs.LAST_QUERIES and not evict:
            count = 0
        if count and policy.needs in (Needs.LAST_QUERIES, Needs.EVERY_QUERY):
            attention = self._per_cached_head(call.scores(count))
        elif count and policy.needs is Needs.QUERY_STATES:
            queries = call.query[:, :, -count:]
        step = self._step(self.query_length, attention, queries, call.scaling)
        policy.update_state(step)
        if evict:
            self.keep(selected_indices(policy, step, self.budget))  # checked: a PolicyOutputError names it

    def _step(
        self,
        query_length: int,
        attention: torch.Tensor | None = None,
        queries: torch.Tensor | None = None,
        scaling: float | None = None,
    ) -> Step:
        """The policy's view of what this layer holds after a forward of `query_length` tokens."""
        return Step(
            self.geometry,
            self.num_layers,
            query_length,
            self.seen_tokens,
            self.real,
            self.positions,
            self.state,
            self.running,
            self.body.read,
            attention,
            queries,
            scaling,
        )

    def _per_cached_head(self, scores: torch.Tensor) -> torch.Tensor:
        """Average attention over the attention heads that share a cached head (latent MLA caches hold one
        shared latent for many attention KV heads), or over all heads when the policy is not per head."""
        heads = self.geometry.kv_heads if self.policy.per_head else 1
        return scores.unflatten(1, (heads, -1)).mean(dim=2)

    def keep(self, indices: torch.Tensor) -> None:
        """Keep, per batch row and KV head (or for all heads: [batch, 1, kept]), the tokens at `indices`."""
        self.body.gather(indices)
        self.real, self.positions = gather_last(self.real, indices), gather_last(self.positions, indices)
        self.state.update({name: gather_last(value, indices) for name, value in self.state.items()})

    def kept_positions(self) -> list[list[list[int]]]:
        """Per batch row and KV head, the positions of the real tokens held (ascending)."""
        if not self.is_initialized:
            return []
        return [
            [positions[real].tolist() for positions, real in zip(row_positions, row_real)]
            for row_positions, row_real in zip(self.positions, self.real)
        ]

    def padding_held(self) -> int:
        """Padding tokens held (as filler, masked) over all rows and heads."""
        return int((~self.real).sum()) if self.is_initialized else 0

    # --- compress once (KVzip): score reconstructions of the held context, then keep the best --------
    reconstructing = False  # set by `EvictionCache.scoring_reconstructions` around reconstruction forwards

    def observe_reconstruction(self, call: AttentionCall) -> None:
        """Instead of `observe` during a reconstruction forward: raise each held token's recorded score
        (`state`, [batch, kv_heads, held]) to the highest attention this forward's queries gave it
        (`policy.reconstruction_scores`); evict nothing. `forget_newest` then drops the forward's tokens."""
        held = self.stored_tokens - self.query_length
        received = self.policy.reconstruction_scores(call, held, self.geometry.kv_heads)
        previous = self.state.get(RECONSTRUCTION_SCORES)
        self.state[RECONSTRUCTION_SCORES] = received if previous is None else torch.maximum(previous, received)

    def forget_newest(self, count: int) -> None:
        """Drop the newest `count` tokens as if never seen (the tokens of a reconstruction forward)."""
        self.body.drop_newest(count)
        self.real, self.positions = self.real[..., :-count], self.positions[..., :-count]
        self.seen_tokens -= count

    def keep_reconstructed(self) -> None:
        """Keep what the policy selects by the recorded reconstruction scores (all tokens when they fit the
        budget), then drop the scores."""
        if self.stored_tokens > self.budget:
            self.keep(selected_indices(self.policy, self._step(query_length=0), self.budget))
        self.state.pop(RECONSTRUCTION_SCORES, None)

    # --- bookkeeping ------------------------------------------------------------------------------
    def crop(self, tokens_to_remove: int, **kwargs) -> None:
        refuse_rollback(self)

    def activate_past_recording(self, **kwargs) -> None:
        refuse_rollback(self)

    def _map_batch(self, fn: TensorMap) -> None:
        super()._map_batch(fn)
        if self.real is not None:
            self.real, self.positions = fn(self.real), fn(self.positions)
        self.state.update({name: fn(value) for name, value in self.state.items()})
        self.running.update({name: fn(value) for name, value in self.running.items()})

    def reset(self) -> None:
        super().reset()
        self.query_length = 0
        self.real = self.positions = None
        self.state, self.running = {}, {}

    def memory_bytes(self) -> int:
        held = (self.real, self.positions, *self.state.values(), *self.running.values())
        bookkeeping = sum(t.nbytes for t in held if t is not None)
        return super().memory_bytes() + bookkeeping
