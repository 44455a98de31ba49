"""What an eviction policy is: a frozen value with its own fields, what it needs, and one selection.

A policy never holds tensors. The layer that serves it (`caches/evicting.py`) hands it a `Step` after
every forward, once attention has used every key, and keeps the indices `select` returns. Running
per-token state (H2O's accumulated attention) lives in `Step.state`, which the layer keeps aligned
with the kept tokens (gathered with them, reordered with beams).
"""

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from hf_kvcache.geometry import LayerGeometry
from hf_kvcache.validation import check_bool, check_int


class Needs(enum.Enum):
    """What a policy reads besides the stored keys and values."""

    NOTHING = "nothing"  # keys, values and positions only (no score capture)
    LAST_QUERIES = "attention of the last queries"  # the forward's last `observation_window` queries
    EVERY_QUERY = "attention of every query"  # every query of every forward
    QUERY_STATES = "the last queries themselves"  # their vectors (after RoPE), not their attention


@dataclass
class Step:
    """What a policy sees after one forward of one layer.

    `attention` is float32 [batch, heads, stored]: the softmax attention of the scored queries summed over
    them, averaged over the query heads of each KV head (heads = the layer's KV heads, or 1 when the
    policy is not `per_head`); None when the policy needs none. `real` is bool [batch, heads, stored]:
    False for padding. `queries` [batch, query heads, n, head_dim] are the last `n` queries after RoPE
    (only for `Needs.QUERY_STATES`). Stored token i was seen at position `positions[b, h, i]`.
    `state` holds per-token tensors [batch, heads or 1, stored] (kept in step with the kept tokens);
    `running` holds other batch-first tensors (e.g. statistics of recent queries), reordered with beams.
    `keys`/`values` [batch, kv_heads, stored, channels] are read from the storage (full precision) on first
    use; `scaling` is the model's logit scale (None: 1 / sqrt(head_dim)).
    """

    geometry: LayerGeometry
    num_layers: int
    query_length: int
    seen: int
    real: torch.Tensor
    positions: torch.Tensor
    state: dict[str, torch.Tensor]
    running: dict[str, torch.Tensor]
    read_stored: Callable[[], tuple[torch.Tensor, torch.Tensor]]
    attention: torch.Tensor | None = None
    queries: torch.Tensor | None = None
    scaling: float | None = None
    _stored: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    @property
    def stored(self) -> int:
        return self.real.shape[-1]

    @property
    def keys(self) -> torch.Tensor:
        return self._read()[0]

    @property
    def values(self) -> torch.Tensor:
        return self._read()[1]

    def _read(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._stored is None:
            self._stored = self.read_stored()
        return self._stored


@dataclass(frozen=True)
class EvictionPolicy:
    """Base of every policy: keeps at most `budget` tokens per layer and KV head.

    A subclass declares `needs`, adds its fields (validated in `__post_init__`), and implements `score`
    (higher = keep; `keep_top` then keeps the best `budget`, never padding in place of a real token).
    Policies that choose differently (per-layer budgets, budgets shared across heads) override `select`.
    `per_head=False` ranks tokens by the score averaged over the layer's heads: every head keeps the same
    tokens. Policies with running state override `update_state`, called after every forward.
    """

    budget: int = 256
    per_head: bool = True
    needs: ClassVar[Needs] = Needs.NOTHING
    ragged: ClassVar[bool] = False  # heads keep different numbers of tokens (needs a ragged storage)

    def __post_init__(self) -> None:
        check_int("budget", self.budget, minimum=1)
        check_bool("per_head", self.per_head)

    def check_within_budget(self, **counts: int) -> None:
        """Every count (tokens always kept: recent, sinks, observation window) must be an int in [0, budget]."""
        for name, value in counts.items():
            hint = f"{type(self).__name__} keeps them within its budget: pass a smaller {name} or a larger budget"
            check_int(name, value, 0, self.budget, maximum_name=f"budget={self.budget}", hint=hint)

    def check_layer(self, geometry: LayerGeometry) -> None:
        """Refuse, at cache construction, a layer this policy cannot serve (a ValueError naming it)."""

    # --- when -------------------------------------------------------------------------------------
    def scored_queries(self, query_length: int) -> int:
        """How many of a forward's last queries the policy reads (attention or vectors)."""
        return query_length if self.needs is Needs.EVERY_QUERY else 0

    def should_evict(self, query_length: int, stored: int, layer_budget: int) -> bool:
        """Whether to select after a forward of `query_length` tokens leaving `stored` tokens."""
        return stored > layer_budget

    def layer_budget(self, layer_index: int, num_layers: int) -> int:
        """Tokens kept per KV head in layer `layer_index` (the same in every layer unless overridden)."""
        return self.budget

    # --- what -------------------------------------------------------------------------------------
    def update_state(self, step: Step) -> None:
        """Update running per-token state in `step.state` (called after every forward)."""

    def score(self, step: Step) -> torch.Tensor:
        """Importance [batch, heads or 1, stored] of every stored token (higher = keep)."""
        raise NotImplementedError(f"{type(self).__name__} must define score(step) (or select(step, budget))")

    def select(self, step: Step, budget: int) -> torch.Tensor:
        """Indices [batch, heads or 1, budget] (ascending) of the stored tokens to keep."""
        return keep_top(step, self.score(step), budget, per_head=self.per_head)


def keep_top(
    step: Step, scores: torch.Tensor, budget: int, per_head: bool = True, recent: int = 0, sink_tokens: int = 0
) -> torch.Tensor:
    """The `budget` best tokens by `scores` [batch, heads or 1, stored], always with the `recent` newest
    tokens and each row's first `sink_tokens` real tokens; padding only when a row has too few real tokens.

    Returns ascending indices [batch, heads, budget] ([batch, 1, budget] when not `per_head`). Ties go to the
    earlier token.
    """
    stored = step.stored
    if scores.dim() != 3 or scores.shape[-1] != stored or scores.shape[1] not in (1, step.real.shape[1]):
        raise ValueError(
            f"a policy's scores must be [batch, heads or 1, stored] = [{step.real.shape[0]}, {step.real.shape[1]} "
            f"or 1, {stored}], got {tuple(scores.shape)}"
        )
    scores = scores.float()
    if not per_head:
        scores = scores.mean(dim=1, keepdim=True)
    real = step.real if per_head else step.real[:, :1]  # every head keeps the same tokens: one row's padding
    scores = scores.expand(-1, real.shape[1], -1).masked_fill(~real, float("-inf"))
    forced = torch.zeros_like(real)
    if recent:
        forced[..., stored - recent :] = True
    if sink_tokens:
        forced |= real & (real.cumsum(dim=-1) <= sink_tokens)
    scores = scores.masked_fill(forced & real, float("inf"))
    # A stable sort breaks ties by position (the earlier token wins), the same in a padded row as alone.
    return scores.sort(dim=-1, descending=True, stable=True).indices[..., :budget].sort(dim=-1).values


RECONSTRUCTION_SCORES = "reconstruction"  # per-token state of a compress-once policy while its context is scored


@dataclass(frozen=True)
class CompressOncePolicy(EvictionPolicy):
    """A policy that compresses a context once, by scoring forwards run over it, and never evicts otherwise.

    The cache runs the protocol (`hf_kvcache.caches.compress_once`): the context is prefilled in forwards of
    `chunk_size` tokens; then, per chunk, one scoring forward of `prompt_ids()` followed by that chunk again,
    after which its tokens are forgotten; each held token keeps the highest score (`reconstruction_scores`)
    any scoring forward gave it; finally `select` keeps the best `budget` per head. Questions then run as
    ordinary forwards, which never evict. A subclass gives `chunk_size` (a field), `prompt_ids` and
    `reconstruction_scores`; tools feed it through `compress_context` (`compress_once` says so).
    """

    compress_once: ClassVar[bool] = True

    def should_evict(self, query_length: int, stored: int, layer_budget: int) -> bool:
        """Never during ordinary forwards: only the compression selects."""
        return False

    def score(self, step: Step) -> torch.Tensor:
        """The highest score each stored token received from the scoring forwards [batch, kv_heads, stored]."""
        return step.state[RECONSTRUCTION_SCORES]

    def prompt_ids(self, model: object, tokenizer: object = None) -> list[int]:
        """The token ids every scoring forward starts with (before the repeated chunk)."""
        raise NotImplementedError(f"{type(self).__name__} must define prompt_ids(model, tokenizer)")

    def reconstruction_scores(self, call: object, held: int, heads: int) -> torch.Tensor:
        """float32 [batch, heads, held]: what one scoring forward's attention call (`scoring.AttentionCall`)
        gives each of the `held` context tokens, for `heads` cached heads."""
        raise NotImplementedError(f"{type(self).__name__} must define reconstruction_scores(call, held, heads)")


STORAGE_SETTINGS = ("bits", "group_size", "residual_length", "rotate")  # what a cache spec may set of `Storage`


PolicyListener = Callable[[str, str, type], None]
_registered: list[tuple[str, str, type]] = []  # (name, help, policy type), in registration order
_listeners: list[PolicyListener] = []


def register_policy(name: str, help: str) -> Callable[[type], type]:
    """Class decorator: make the policy a cache spec, `name:field=value,...` (its fields plus the storage's
    `bits`, `group_size`, `residual_length`, `rotate`), for `hf-kvcache eval --cache` and `build_cache`.

    The policy is only recorded here; the caches (`caches/evicting.py`, above this module) turn every recorded
    policy into a spec (`on_policy_registered`).

    Raises:
        ValueError: `name` is already the name of another registered cache.
    """

    def register(policy_type: type) -> type:
        for listener in _listeners:
            listener(name, help, policy_type)
        _registered.append((name, help, policy_type))
        return policy_type

    return register


def on_policy_registered(listener: PolicyListener) -> None:
    """Call `listener(name, help, policy_type)` for every policy registered so far and every later one."""
    _listeners.append(listener)
    for registration in _registered:
        listener(*registration)
