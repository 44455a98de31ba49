"""How hf_kvcache's caches reach transformers' attention and mask functions: one registration, routes carried
by the returned keys, and a forward context owned by each cache.

A cache's `update` never sees attention, yet three features need it: eviction policies read attention scores,
KVzip's reconstruction scores them, and a quantized cache's decode attends its codes. Sink caches also correct
the masks. They all go through this module:

- **Routes.** A layer's `update` returns its keys tagged with a `Route` (`tag`: a view of the keys carrying it,
  never a stored tensor). The attention wrapper of the route's entry finds it on the `key` it is called with and
  lets it attend (`Route.attend`); a call whose key carries no route for it runs the original function
  unchanged, so a model without an hf_kvcache cache behaves exactly as before. A model that changes keys between
  the cache update and attention drops the tag, so such a layer never reads codes. Score routes are not bound to
  their key (`served_by_key = False`): latent-attention models (DeepSeek-V3) cache a latent and expand it into
  keys after the update, and their scores are still the model's. The cache's context hands such a route to the
  thread's mailbox, and the next call of its entry takes it, whatever its key.
- **A forward context per cache** (`ForwardContext`): the route the cache's last layer returned, and the attention
  implementation the mask function saw. When a layer returns a route, the previous one must have been taken;
  if not, that route's own error is raised (the model's attention bypassed the wrapper). The context is reset
  when a forward builds its masks, so what an interrupted forward left can neither fail nor serve a later one.
- **One mailbox per thread, emptied within the forward.** transformers calls `cache.get_mask_sizes` and then,
  within the same `create_*_mask` call, the mask function, which is not given the cache. The cache leaves a
  `MaskRequest` in the mailbox; the mask wrapper, on every mask function transformers ships, takes it and asks
  the cache to prepare the mask (`prepare_mask`). The cache's first layer update of a forward drops a request
  still there. A handed-over score route is taken by its attention call; a forward that stops before that leaves
  it until the next forward in the thread begins, which drops it. `pending()` shows what the mailbox holds.

Entries (`install`, idempotent, through transformers' public `AttentionInterface.register` and
`AttentionMaskInterface.register`): `sdpa` (serves code and probe routes), `hf_kvcache_scores_sdpa` and
`hf_kvcache_scores_eager` (score capture: serve score routes), and every mask function. A wrapper is known by
its `hf_kvcache_original` attribute, the function it wraps.
"""

import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface

SDPA = "sdpa"
CAPTURE = "capture"
CAPTURE_PREFIX = "hf_kvcache_scores_"
CAPTURE_BASES = ("sdpa", "eager")  # the implementations score capture wraps
ROUTE_ATTRIBUTE = "hf_kvcache_route"
ORIGINAL_ATTRIBUTE = "hf_kvcache_original"


class Route:
    """Where a layer's returned keys go: the attention entry that serves it (`entry`: `SDPA` or `CAPTURE`) and
    what that entry does with the call (`attend`). `taken` becomes True when the entry has served it: a route is
    served by one call only."""

    entry: ClassVar[str]
    served_by_key: ClassVar[bool] = True  # False: the next call of `entry` in this thread serves it, whatever its key
    taken: bool = False

    def attend(
        self,
        attention: Callable,
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The attention output and weights for this call; `attention` is the entry's original function."""
        raise NotImplementedError

    def unread_error(self) -> Exception | None:
        """The error to raise when the route was never taken (None: nothing was lost)."""
        return None


def tag(keys: torch.Tensor, route: Route) -> torch.Tensor:
    """A view of `keys` carrying `route` (the stored tensor itself is never tagged)."""
    view = keys.view_as(keys)
    setattr(view, ROUTE_ATTRIBUTE, route)
    return view


def route_of(key: torch.Tensor) -> Route | None:
    return getattr(key, ROUTE_ATTRIBUTE, None)


@dataclass
class ForwardContext:
    """What a cache knows of the forward it is in: the attention implementation its mask function saw
    (`implementation`, None until then), the tokens its mask layer had seen when the masks were built (`seen`),
    and the route its last updated layer returned (`returned`)."""

    implementation: str | None = None
    seen: int = -1
    returned: Route | None = None

    def begin(self, seen: int) -> None:
        """A forward builds its masks: nothing of an earlier, possibly interrupted, forward counts any more."""
        self.implementation, self.seen, self.returned = None, seen, None
        _mailbox.route = None

    def hand_over(self, keys: torch.Tensor) -> None:
        """Record the route `keys` carry (if any) as the one the next update checks.

        Raises:
            the previous route's `unread_error()`, when the attention never took it.
        """
        previous, self.returned = self.returned, route_of(keys)
        if previous is not None and not previous.taken and (error := previous.unread_error()) is not None:
            _mailbox.route = None
            raise error
        if self.returned is not None and not self.returned.served_by_key:
            _mailbox.route = self.returned


@dataclass
class MaskRequest:
    """Left by a cache's `get_mask_sizes` for the mask function that follows: the cache, the layer whose mask
    is built, and the `kv_offset` transformers will pass with it."""

    cache: object
    layer: object
    kv_offset: int


_mailbox = threading.local()


def request_mask(request: MaskRequest) -> None:
    _mailbox.request = request


def take_mask_request() -> MaskRequest | None:
    request = getattr(_mailbox, "request", None)
    _mailbox.request = None
    return request


def drop_mask_request() -> None:
    _mailbox.request = None


def _take_route(entry: str) -> Route | None:
    route = getattr(_mailbox, "route", None)
    if route is None or route.entry != entry:
        return None
    _mailbox.route = None
    return route


def pending() -> tuple[MaskRequest | None, Route | None]:
    """What this thread's mailbox holds: a mask request and a handed-over route (both None after a forward)."""
    return getattr(_mailbox, "request", None), getattr(_mailbox, "route", None)


def _eager_of(module: torch.nn.Module) -> Callable:
    """The model's own eager attention (each modeling file defines `eager_attention_forward`)."""
    function = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if function is None:
        raise ValueError(
            f"{type(module).__name__} has no eager_attention_forward in its modeling file, so score capture "
            f"cannot wrap its eager attention; load the model with attn_implementation='sdpa'"
        )
    return function


def _routed_attention(resolve: Callable[[torch.nn.Module], Callable], entry: str) -> Callable:
    def attention(module, query, key, value, attention_mask, **kwargs):
        original = resolve(module)
        route = _take_route(entry) or route_of(key)
        if route is None or route.entry != entry or route.taken:  # served once (DiffLlama attends a key twice)
            return original(module, query, key, value, attention_mask, **kwargs)
        route.taken = True
        return route.attend(original, module, query, key, value, attention_mask, **kwargs)

    return attention


def _routed_mask(mask_function: Callable, name: str) -> Callable:
    def mask(*args, attention_mask=None, kv_offset=0, **kwargs):
        request = take_mask_request()
        if request is not None:
            attention_mask, overrides = request.cache.prepare_mask(
                request, name, attention_mask, kv_offset, kwargs.get("config")
            )
            kwargs.update(overrides)
        return mask_function(*args, attention_mask=attention_mask, kv_offset=kv_offset, **kwargs)

    return mask


def _capture_mask(base: str) -> Callable:
    # Looked up at call time: the base entry's wrapper (and whatever is installed on it later) still applies.
    def mask(*args, **kwargs):
        return AttentionMaskInterface._global_mapping[base](*args, **kwargs)

    return mask


def _register(interface: type, name: str, function: Callable, original: Callable | None) -> None:
    setattr(function, ORIGINAL_ATTRIBUTE, original)
    interface.register(name, function)


def _always(function: Callable) -> Callable[[torch.nn.Module], Callable]:
    return lambda module: function


def _ours(function: Callable | None) -> bool:
    return function is not None and hasattr(function, ORIGINAL_ATTRIBUTE)


def install() -> None:
    """Register the routed `sdpa` attention, the score-capture entries and the mask wrappers (idempotent)."""
    attention = AttentionInterface._global_mapping
    if not _ours(attention.get(SDPA)):
        sdpa = attention[SDPA]
        _register(AttentionInterface, SDPA, _routed_attention(_always(sdpa), SDPA), sdpa)
    for base in CAPTURE_BASES:
        if not _ours(attention.get(CAPTURE_PREFIX + base)):
            resolve = _always(sdpa_attention_forward) if base == "sdpa" else _eager_of
            _register(AttentionInterface, CAPTURE_PREFIX + base, _routed_attention(resolve, CAPTURE), None)
            _register(AttentionMaskInterface, CAPTURE_PREFIX + base, _capture_mask(base), None)
    for name, mask_function in list(AttentionMaskInterface._global_mapping.items()):
        if not _ours(mask_function):
            _register(AttentionMaskInterface, name, _routed_mask(mask_function, name), mask_function)


def installed() -> bool:
    """Whether transformers' `sdpa` entry is still the routed one (another library may have replaced it)."""
    return _ours(AttentionInterface._global_mapping.get(SDPA))
