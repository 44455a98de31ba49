"""Eviction policies: what a cache keeps. Each is a small frozen dataclass (see `base.EvictionPolicy`).

Every module of this package is imported here, and each policy registers itself as a cache spec with
`@register_policy(name, help)`, so adding a method takes one file and its test:

1. `hf_kvcache/policies/my_method.py`: a frozen dataclass subclass of `EvictionPolicy` with its own fields
   (checked in `__post_init__`), `needs` (nothing, the attention of the last queries or of every
   query, or the query vectors), and `score(step)` returning the importance of every stored token
   ([batch, heads, stored], higher = keep; `step` gives keys, attention, positions, padding). Override
   `select` for another selection (per-layer budgets: `layer_budget`), `update_state` for running state.
   Link the paper in the docstring.
2. `tests/policies/test_my_method.py`: kept tokens against an independent reference.

The decorators go in this order (fields only exist on a dataclass)::

    @register_policy("value-norm", "keep the largest value norms")
    @dataclass(frozen=True)
    class ValueNorm(EvictionPolicy):
        def score(self, step):
            return step.values.float().norm(dim=-1)

It then works with every storage (`Storage(bits=..., token_wise=True)`), in `EvictionCache(config,
MyMethod(budget=...))`, on padded batches, and, once this package imports it (a file in this folder), as
`hf-kvcache eval --cache my-method:budget=128,bits=4`. A policy in your own module works from Python as soon
as you import it. Names of registered caches cannot be taken twice. With `bits`, the newest
`residual_length` (128) kept tokens stay in full precision: below that budget 4-bit storage saves nothing
unless you lower `residual_length`.
"""

import importlib
import pkgutil

from hf_kvcache.policies.base import EvictionPolicy, Needs, Step, keep_top, register_policy

__all__ = ["EvictionPolicy", "Needs", "Step", "keep_top", "register_policy"]

for _module in pkgutil.iter_modules(__path__):
    if _module.name == "base":
        continue
    _loaded = importlib.import_module(f"{__name__}.{_module.name}")
    for _name, _value in vars(_loaded).items():
        if isinstance(_value, type) and issubclass(_value, EvictionPolicy) and _value.__module__ == _loaded.__name__:
            globals()[_name] = _value
            __all__.append(_name)
