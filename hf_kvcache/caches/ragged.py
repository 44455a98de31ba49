"""Ragged per-head storage: each KV head keeps its own number of tokens, and only those are held.

A `RaggedPolicyLayer` serves policies whose heads keep different numbers of tokens (`policy.ragged`,
Ada-KV). Each batch row holds one store of shape [1, 1, tokens, channels] with the kept tokens of all
its heads in arrival order, and per token its head, position and padding status. Attention needs dense
tensors: `update` lays each head's tokens out at the front of a [batch, heads, longest, channels] copy
(built for the forward, then dropped, as `DynamicCache` concatenates its whole cache each step) and
the shorter heads' empty slots are masked per head (`scoring.with_stored_padding`). Memory held is the
kept tokens only (`memory_bytes` counts the stores and the per-token records).

Any storage that can keep single tokens serves it (full precision, per-token quantization; the
residual of a quantized row store counts the row's tokens over all heads). A policy selects on the
layout of the attention call: the stored tokens' slots, then this forward's tokens; it returns a
bool mask of what to keep. Per-token policy state (`Step.state`) is not kept for ragged layers.
"""

import copy

import torch

from hf_kvcache.attention.routing import tag
from hf_kvcache.caches.policy_layer import PolicyLayer
from hf_kvcache.caches.storage import KVStore, TensorMap
from hf_kvcache.policies.base import Step, selected_mask
from hf_kvcache.scoring import AttentionCall, ScoreRoute, padding_of_new_tokens, with_stored_padding


class RaggedPolicyLayer(PolicyLayer):
    """A policy layer whose KV heads keep different numbers of tokens (see the module docstring)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.rows: list[KVStore] = []
        self.token_heads: list[torch.Tensor] = []  # per row: uint8 [tokens], the KV head of each held token
        self.row_positions: list[torch.Tensor] = []  # per row: int32 [tokens]
        self.row_real: list[torch.Tensor] = []  # per row: bool [tokens]
        self.slots: torch.Tensor | None = None  # int64 [batch, heads, slots]: row-store index of each slot, or -1
        self.call_states: tuple[torch.Tensor, torch.Tensor] | None = None  # this forward's dense KV, until `observe`

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        template = key_states[:1, :1, :0], value_states[:1, :1, :0]
        self.rows = [self.storage.new_store(*template) for _ in range(key_states.shape[0])]
        empty = key_states.new_empty(0, dtype=torch.int32)
        self.token_heads = [empty.to(torch.uint8) for _ in self.rows]
        self.row_positions = [empty for _ in self.rows]
        self.row_real = [empty.to(torch.bool) for _ in self.rows]

    # --- token accounting: the dense layout's slots -----------------------------------------------
    @property
    def stored_tokens(self) -> int:
        """Slots per head in the dense layout: the most tokens any head of any row keeps."""
        if not self.is_initialized:
            return 0
        counts = [torch.bincount(heads.long(), minlength=1).max() for heads in self.token_heads if len(heads)]
        return int(max(counts, default=0))

    def held_tokens(self) -> torch.Tensor:
        """int64 [batch, kv_heads]: tokens each head really holds."""
        return torch.stack([torch.bincount(h.long(), minlength=self.geometry.kv_heads) for h in self.token_heads])

    def _dense(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Slots [batch, heads, longest] (row-store index or -1), and the held keys and values laid out on them."""
        heads_count, longest = self.geometry.kv_heads, self.stored_tokens
        slots = torch.full((len(self.rows), heads_count, longest), -1, dtype=torch.long, device=self.device)
        keys = self.head.keys.new_zeros((len(self.rows), heads_count, longest, self.geometry.key_dim))
        values = self.head.values.new_zeros((len(self.rows), heads_count, longest, self.geometry.value_dim))
        for row, (store, heads) in enumerate(zip(self.rows, self.token_heads)):
            if not len(heads):
                continue
            heads = heads.long()
            order = torch.sort(heads, stable=True).indices  # arrival order within each head
            starts = torch.cumsum(torch.bincount(heads, minlength=heads_count), 0) - torch.bincount(heads)
            slot = torch.empty_like(order)
            slot[order] = torch.arange(len(order), device=order.device) - starts[heads[order]]
            slots[row, heads, slot] = torch.arange(len(heads), device=heads.device)
            row_keys, row_values = store.read()
            keys[row, heads, slot], values[row, heads, slot] = row_keys[0, 0], row_values[0, 0]
        return slots, keys, values

    # --- reading and writing ----------------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.slots, keys, values = self._dense()
        batch, heads, count = key_states.shape[:3]
        # New token t of head h goes to row-store index held + t * heads + h (time-major, below).
        new_slots = (
            torch.arange(count, device=self.device)[None] * heads + torch.arange(heads, device=self.device)[:, None]
        )
        held = torch.tensor([len(h) for h in self.token_heads], device=self.device)
        self.slots = torch.cat([self.slots, new_slots[None] + held[:, None, None]], dim=-1)
        self.seen_tokens += count
        for row in range(batch):  # time-major: the row store's order is arrival order within every head
            row_keys = key_states[row].transpose(0, 1).reshape(1, 1, heads * count, -1)
            row_values = value_states[row].transpose(0, 1).reshape(1, 1, heads * count, -1)
            self.rows[row].append(row_keys, row_values)
            self.token_heads[row] = torch.cat(
                [self.token_heads[row], torch.arange(heads, device=self.device).repeat(count).byte()]
            )
            positions = torch.arange(self.seen_tokens - count, self.seen_tokens, device=self.device, dtype=torch.int32)
            self.row_positions[row] = torch.cat([self.row_positions[row], positions.repeat_interleave(heads)])
            self.row_real[row] = torch.cat([self.row_real[row], self.row_real[row].new_ones(heads * count)])
        self.query_length = count
        self.call_states = torch.cat([keys, key_states], dim=-2), torch.cat([values, value_states], dim=-2)
        keys, values = self.call_states
        return tag(keys, ScoreRoute(self)), values

    def _layout(self, per_token: list[torch.Tensor], fill: object) -> torch.Tensor:
        """A per-token record laid out on the current slots [batch, heads, slots] (`fill` where empty)."""
        records = torch.stack([torch.cat([t, t.new_full((1,), fill)]) for t in self._padded(per_token)])
        return records.gather(1, torch.where(self.slots < 0, records.shape[1] - 1, self.slots).flatten(1)).view_as(
            self.slots
        )

    def _padded(self, per_token: list[torch.Tensor]) -> list[torch.Tensor]:
        longest = max(len(t) for t in per_token)
        return [torch.nn.functional.pad(t, (0, longest - len(t))) for t in per_token]

    # --- called by the capturing attention function -----------------------------------------------
    def attention_mask(self, attention_mask: torch.Tensor | None, query: torch.Tensor) -> torch.Tensor | None:
        new_real = padding_of_new_tokens(attention_mask, self.query_length)
        heads = self.geometry.kv_heads
        if new_real is not None:
            for row in range(len(self.rows)):
                tail = self.row_real[row][-heads * self.query_length :]
                tail.copy_(new_real[min(row, len(new_real) - 1)].repeat_interleave(heads))
        real = self._layout(self.row_real, False)
        return with_stored_padding(attention_mask, real[..., : -self.query_length], query)

    def observe(self, call: AttentionCall) -> None:
        policy, stored = self.policy, self.slots.shape[-1]
        count = min(policy.scored_queries(self.query_length), self.query_length)
        states, self.call_states = self.call_states, None
        if not (count and policy.should_evict(self.query_length, stored, self.budget)):
            return
        real = self._layout(self.row_real, False)
        step = Step(
            self.geometry,
            self.num_layers,
            self.query_length,
            self.seen_tokens,
            real,
            self._layout(self.row_positions, 0),
            {},
            self.running,
            lambda: states,
            self._per_cached_head(call.scores(count)),
            scaling=call.scaling,
        )
        self.keep_mask(selected_mask(policy, step, self.budget))  # checked, real tokens only

    def keep_mask(self, keep: torch.Tensor) -> None:
        """Keep, per row, the held tokens whose slots are True in `keep` [batch, heads, slots]."""
        for row in range(len(self.rows)):
            kept = self.slots[row][keep[row]].sort().values
            self.rows[row].gather(kept[None, None])
            self.token_heads[row], self.row_positions[row], self.row_real[row] = (
                t[kept] for t in (self.token_heads[row], self.row_positions[row], self.row_real[row])
            )

    def kept_positions(self) -> list[list[list[int]]]:
        return [
            [positions[(heads == head) & real].tolist() for head in range(self.geometry.kv_heads)]
            for heads, positions, real in zip(self.token_heads, self.row_positions, self.row_real)
        ]

    def padding_held(self) -> int:
        return sum(int((~real).sum()) for real in self.row_real)

    # --- bookkeeping ------------------------------------------------------------------------------
    def _map_batch(self, fn: TensorMap) -> None:
        if not self.is_initialized:
            return
        rows = fn(torch.arange(len(self.rows), device=self.device)).tolist()  # which old row each new row is
        self.rows = [copy.copy(self.rows[row]) for row in rows]  # stores replace, never mutate, their tensors
        for name in ("token_heads", "row_positions", "row_real"):
            setattr(self, name, [getattr(self, name)[row] for row in rows])
        self.running.update({name: fn(value) for name, value in self.running.items()})

    def reset(self) -> None:
        super().reset()
        self.rows, self.token_heads, self.row_positions, self.row_real = [], [], [], []
        self.slots = self.call_states = None

    def memory_bytes(self) -> int:
        records = [*self.token_heads, *self.row_positions, *self.row_real, *self.running.values()]
        return sum(store.nbytes() for store in self.rows) + sum(t.nbytes for t in records)
