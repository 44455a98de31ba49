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

    `compaction_interval` (keyword only, every policy that evicts while decoding): decoding steps between
    compactions. A layer lets single-token steps add `compaction_interval - 1` tokens beyond its budget, then
    compacts down to the budget (the selection runs once per `compaction_interval` tokens, and the evicted
    tokens' memory is freed each time); a layer holds at most `budget + compaction_interval - 1` tokens between
    forwards. 1 (the default): every step, as the papers describe. Multi-token forwards (prompts, chunks)
    always compact to the budget. The idea of kvpress's `DecodingPress` (`compression_interval`).

    Raises:
        ValueError: a field out of range, or `compaction_interval` other than 1 for a policy that never evicts
            while decoding (SnapKV and its kin, compress-once policies).
    """

    budget: int = 256
    per_head: bool = True
    compaction_interval: int = field(default=1, kw_only=True)
    needs: ClassVar[Needs] = Needs.NOTHING
    ragged: ClassVar[bool] = False  # heads keep different numbers of tokens (needs a ragged storage)
    evicts_while_decoding: ClassVar[bool] = True  # False: single-token forwards never evict

    def __post_init__(self) -> None:
        check_int("budget", self.budget, minimum=1)
        check_bool("per_head", self.per_head)
        check_int("compaction_interval", self.compaction_interval, minimum=1, hint="decoding steps between compactions")
        if self.compaction_interval != 1 and not self.evicts_while_decoding:
            decoding = sorted(name for name, _, kind in _registered if kind.evicts_while_decoding)
            raise ValueError(
                f"compaction_interval={self.compaction_interval!r}: {type(self).__name__} never evicts while decoding "
                "(single-token forwards keep every token), so there is no decoding compaction to space out; pass 1, "
                f"or use a policy that evicts while decoding ({', '.join(decoding)})"
            )

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
        """Whether to select after a forward of `query_length` tokens leaving `stored` tokens: after a
        multi-token forward whenever more than `layer_budget` are held, after a decoding step once
        `compaction_interval` more than `layer_budget` are."""
        allowance = self.compaction_interval - 1 if query_length == 1 else 0
        return stored > layer_budget + allowance

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
        """Indices [batch, heads or 1, at most budget] (strictly ascending) of the stored tokens to keep; a
        `ragged` policy returns a bool mask [batch, heads or 1, stored] instead. The caches check the result
        (`selected_indices`, `selected_mask`)."""
        return keep_top(step, self.score(step), budget, per_head=self.per_head)


def extend_window(running: dict[str, torch.Tensor], window: int, **newest: torch.Tensor) -> None:
    """Append each of `newest` to `running[name]` along its token dimension (2 for [batch, heads, tokens, channels],
    1 for [batch, tokens]) and keep its `window` newest tokens: a policy's buffer of recent queries."""
    for name, tensor in newest.items():
        dim = 2 if tensor.dim() == 4 else 1
        if name in running:
            tensor = torch.cat([running[name], tensor], dim=dim)
        running[name] = tensor.narrow(dim, max(0, tensor.shape[dim] - window), min(window, tensor.shape[dim]))


def check_keys_meet_queries(
    policy: "EvictionPolicy", geometry: LayerGeometry, query_channels: int | None = None
) -> None:
    """For policies that score cached keys with query vectors: refuse a layer whose cached keys are not the keys
    its queries meet (a latent MLA cache: read from the geometry at construction, or from `query_channels`
    queries meeting keys of another size while scoring).

    Raises:
        ValueError: naming the layer, the policy and the policies that can serve it.
    """
    latent = geometry.rope is not None and geometry.rope.slot == "values"
    if latent or (query_channels is not None and query_channels != geometry.key_dim):
        sizes = (
            "" if query_channels is None else f" ({geometry.key_dim}-channel keys, {query_channels}-channel queries)"
        )
        raise ValueError(
            f"{geometry.describe()}: {type(policy).__name__} scores cached keys with the queries, but this layer "
            f"caches a latent (multi-head latent attention), not the keys its queries meet{sizes}; use a policy "
            "that reads attention (snapkv, h2o) or keys only (knorm)"
        )


def keep_top(
    step: Step, scores: torch.Tensor, budget: int, per_head: bool = True, recent: int = 0, sink_tokens: int = 0
) -> torch.Tensor:
    """The `budget` best tokens by `scores` [batch, heads or 1, stored], always with the `recent` newest
    tokens and each row's first `sink_tokens` real tokens; padding only when a row has too few real tokens.

    Returns ascending indices [batch, heads, budget] ([batch, 1, budget] when not `per_head`). Ties go to the
    earlier token.

    Raises:
        PolicyOutputError: `scores` not a floating tensor [batch, heads or 1, stored], or not finite at a real
            token (`check_scores`).
    """
    stored = step.stored
    scores = check_scores(step, scores)
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


class PolicyOutputError(ValueError):
    """What a policy's `score` or `select` returned cannot be kept: the message names the policy (when a cache
    asked it), what it returned and what is accepted."""


def _shown(tensor: torch.Tensor, limit: int = 12) -> str:
    """A short text of a 1-D tensor's first `limit` values."""
    values = tensor.flatten()[:limit].tolist()
    return f"[{', '.join(map(str, values))}{', ...' if tensor.numel() > limit else ''}]"


def check_scores(step: Step, scores: object) -> torch.Tensor:
    """`scores` as float32 [batch, heads or 1, stored], checked: a floating (or integer) tensor of that shape,
    finite (no NaN, no infinity) at every real token; padding is masked anyway. One pass over the scores.

    Raises:
        PolicyOutputError: another type, dtype or shape, or a non-finite score at a real token (the first named).
    """
    batch, heads, stored = step.real.shape
    if not isinstance(scores, torch.Tensor) or scores.dtype in (torch.bool, torch.complex64, torch.complex128):
        kind = f"a {scores.dtype} tensor" if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise PolicyOutputError(f"a policy's scores must be a real-valued torch.Tensor, got {kind}")
    if scores.dim() != 3 or scores.shape[0] != batch or scores.shape[-1] != stored or scores.shape[1] not in (1, heads):
        raise PolicyOutputError(
            f"a policy's scores must be [batch, heads or 1, stored] = [{batch}, {heads} or 1, {stored}], got "
            f"{tuple(scores.shape)}"
        )
    scores = scores.float()
    bad = ~torch.isfinite(scores) & step.real
    if bad.any():
        b, h, i = (int(x) for x in bad.nonzero()[0])
        raise PolicyOutputError(
            f"a policy's scores must be finite at every real token (higher = keep; padding is never kept), got "
            f"{scores[b, min(h, scores.shape[1] - 1), i].item()} for stored token {i} of batch row {b}, head {h} "
            f"({int(bad.sum())} non-finite scores in all)"
        )
    return scores


INTEGER_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def _named(policy: "EvictionPolicy", error: PolicyOutputError) -> PolicyOutputError:
    return PolicyOutputError(f"{type(policy).__name__}.select(step, budget): {error}")


def selected_indices(policy: "EvictionPolicy", step: Step, budget: int) -> torch.Tensor:
    """`policy.select(step, budget)`, checked, as int64: what a dense policy layer keeps.

    Accepted: an integer tensor [batch, heads or 1, kept] with kept <= budget, each row strictly ascending
    (distinct: no token attended twice; in order: the storage's newest tokens stay last) and within
    0 .. stored - 1. One comparison pass over the indices (they are sorted already); never fixed silently.

    Raises:
        PolicyOutputError: anything else, naming the policy class, what it returned and what is accepted;
            also bad scores found by `keep_top` (`check_scores`).
    """
    try:
        indices = policy.select(step, budget)
    except PolicyOutputError as error:
        raise _named(policy, error) from None
    batch, heads, stored = step.real.shape
    accepted = (
        f"accepted: an integer tensor [batch, heads or 1, at most budget] = [{batch}, {heads} or 1, <= {budget}] "
        f"of strictly ascending indices into the {stored} stored tokens (0 .. {stored - 1})"
    )
    if not isinstance(indices, torch.Tensor) or indices.dtype not in INTEGER_DTYPES:
        kind = f"a {indices.dtype} tensor" if isinstance(indices, torch.Tensor) else type(indices).__name__
        raise _named(policy, PolicyOutputError(f"returned {kind}; {accepted}"))
    shape = tuple(indices.shape)
    if len(shape) != 3 or shape[0] != batch or shape[1] not in (1, heads) or shape[2] > budget:
        raise _named(policy, PolicyOutputError(f"returned indices of shape {shape}; {accepted}"))
    if indices.numel():
        indices = indices.long()
        steps = indices.diff(dim=-1)
        if bool((indices[..., 0] < 0).any() | (indices[..., -1] >= stored).any() | (steps <= 0).any()):
            raise _named(policy, PolicyOutputError(f"{_first_bad_row(indices, steps, stored)}; {accepted}"))
    return indices.long()


def _first_bad_row(indices: torch.Tensor, steps: torch.Tensor, stored: int) -> str:
    """What is wrong with the first bad row of `indices` (only called once a row is known to be bad)."""
    for b, row_heads in enumerate(indices):
        for h, row in enumerate(row_heads):
            where = f"batch row {b}, head {h}: {_shown(row)}"
            outside = row[(row < 0) | (row >= stored)]
            if len(outside):
                return f"returned index {int(outside[0])} outside 0 .. {stored - 1} (at {where})"
            if (steps[b, h] == 0).any() or len(row.unique()) != len(row):
                repeated = row.sort().values
                twice = repeated[1:][repeated[1:] == repeated[:-1]]
                return f"returned index {int(twice[0])} more than once (at {where})"
            if (steps[b, h] < 0).any():
                return f"returned indices not in ascending order (at {where}; sort them: indices.sort(-1).values)"
    return "returned bad indices"


def selected_mask(policy: "EvictionPolicy", step: Step, budget: int) -> torch.Tensor:
    """`policy.select(step, budget)` of a `ragged` policy, checked, restricted to real tokens: what a ragged
    layer keeps, bool [batch, heads, stored].

    Accepted: a bool tensor [batch, heads or 1, stored] keeping at most budget x heads real tokens per batch
    row (the layer's budget, shared among its heads). One sum over the mask.

    Raises:
        PolicyOutputError: anything else, naming the policy class, what it returned and what is accepted.
    """
    try:
        mask = policy.select(step, budget)
    except PolicyOutputError as error:
        raise _named(policy, error) from None
    batch, heads, stored = step.real.shape
    accepted = (
        f"accepted: a bool mask [batch, heads or 1, stored] = [{batch}, {heads} or 1, {stored}] keeping at most "
        f"budget x heads = {budget * heads} real tokens per batch row"
    )
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        kind = f"a {mask.dtype} tensor" if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise _named(policy, PolicyOutputError(f"returned {kind}; {accepted}"))
    shape = tuple(mask.shape)
    if len(shape) != 3 or shape[0] != batch or shape[1] not in (1, heads) or shape[2] != stored:
        raise _named(policy, PolicyOutputError(f"returned a mask of shape {shape}; {accepted}"))
    mask = mask & step.real
    kept = mask.sum(dim=(1, 2))
    if bool((kept > budget * heads).any()):
        row = int((kept > budget * heads).nonzero()[0])
        raise _named(policy, PolicyOutputError(f"kept {int(kept[row])} tokens in batch row {row}; {accepted}"))
    return mask


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
    evicts_while_decoding = False

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
