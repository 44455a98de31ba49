"""Cache specs: `name:param=value,...` strings that name a registered cache strategy and its settings.

A strategy registers once, with one line next to its class::

    register_cache("quantized", QuantizedCache, "KIVI-style quantized keys and values")

Its parameters, their types and defaults are read from the factory signature (every parameter after
the first, which receives the model config), so `hf-kvcache eval --cache quantized:bits=2` and the
`--help` listing pick up new strategies without touching the command line.
"""

import dataclasses
import importlib.util
import inspect
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field

from transformers import DynamicCache, PreTrainedConfig
from transformers.cache_utils import Cache
from transformers.cache_utils import QuantizedCache as TransformersQuantizedCache

CacheFactory = Callable[..., Cache]
_TRUE, _FALSE = {"true", "yes", "1", "on"}, {"false", "no", "0", "off"}


@dataclass(frozen=True)
class Parameter:
    """One factory parameter: its name, accepted types and default."""

    name: str
    types: tuple[type, ...]
    default: object

    def describe(self) -> str:
        names = "|".join("None" if t is type(None) else t.__name__ for t in self.types)
        return f"{self.name}: {names} = {self.default!r}"

    def convert(self, text: str) -> object:
        """Turn the text of a spec value into this parameter's type, or raise ValueError."""
        if text.lower() == "none" and type(None) in self.types:
            return None
        for kind in self.types:
            if kind is bool:
                if text.lower() in _TRUE | _FALSE:
                    return text.lower() in _TRUE
            elif kind in (int, float, str):
                try:
                    return kind(text)
                except ValueError:
                    continue
        raise ValueError(f"{self.name}={text!r} is not a valid value; expected {self.describe()}")


@dataclass(frozen=True)
class Registration:
    """A registered strategy: its factory, a one-line help and its parameters."""

    name: str
    factory: CacheFactory
    help: str
    parameters: dict[str, Parameter]

    def describe(self) -> str:
        params = ", ".join(p.describe() for p in self.parameters.values()) or "no parameters"
        return f"{self.name}: {self.help} ({params})"


@dataclass(frozen=True)
class CacheSpec:
    """A parsed spec: the strategy name, its explicit parameters, and a label for reports."""

    name: str
    params: dict[str, object] = field(default_factory=dict)

    @property
    def label(self) -> str:
        if not self.params:
            return self.name
        return self.name + ":" + ",".join(f"{key}={value}" for key, value in self.params.items())


_REGISTRY: dict[str, Registration] = {}


def _parameter_types(annotation: object) -> tuple[type, ...]:
    if annotation is inspect.Parameter.empty:
        return (str,)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return tuple(typing.get_args(annotation))
    return (annotation,)


def _parameters(factory: CacheFactory) -> dict[str, Parameter]:
    target = factory.__init__ if inspect.isclass(factory) else factory
    hints = typing.get_type_hints(target)
    signature = inspect.signature(factory)
    found = {}
    for index, param in enumerate(signature.parameters.values()):
        if index == 0 or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue  # the first parameter receives the model config
        if param.default is inspect.Parameter.empty:
            raise ValueError(f"cache factory {factory!r}: parameter {param.name!r} needs a default")
        found[param.name] = Parameter(
            param.name, _parameter_types(hints.get(param.name, param.annotation)), param.default
        )
    return found


def fields_as_parameters(owner: type, names: list[str] | None = None) -> dict[str, Parameter]:
    """Parameters from a dataclass's fields (all, or `names`): their annotated types and defaults."""
    hints = typing.get_type_hints(owner)
    chosen = [f for f in dataclasses.fields(owner) if names is None or f.name in names]
    return {f.name: Parameter(f.name, _parameter_types(hints[f.name]), f.default) for f in chosen}


def register_cache(name: str, factory: CacheFactory, help: str, parameters: dict[str, Parameter] | None = None) -> None:
    """Register `factory(config, **params) -> Cache` under `name` (re-registering replaces it).

    `parameters` default to those of the factory's signature (every parameter after the config)."""
    if not name or any(c in name for c in ":,= "):
        raise ValueError(f"cache name {name!r} must be non-empty and contain none of ':', ',', '=', ' '")
    _REGISTRY[name] = Registration(name, factory, help, _parameters(factory) if parameters is None else parameters)


def registered_caches() -> dict[str, Registration]:
    """Every registered strategy, by name."""
    return dict(_REGISTRY)


def describe_caches() -> str:
    """One line per registered strategy with its parameters, for `--help`."""
    return "\n".join(f"  {registration.describe()}" for registration in _REGISTRY.values())


def parse_cache_spec(text: str) -> CacheSpec:
    """Parse `name` or `name:key=value,key=value` against the registry, converting values to their types."""
    name, _, rest = text.strip().partition(":")
    if name not in _REGISTRY:
        raise ValueError(f"unknown cache {name!r} in spec {text!r}; registered caches: {', '.join(_REGISTRY)}")
    registration = _REGISTRY[name]
    params: dict[str, object] = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, equals, value = item.partition("=")
        key = key.strip()
        if not equals:
            raise ValueError(f"cache spec {text!r}: {item!r} is not of the form key=value")
        if key not in registration.parameters:
            accepted = ", ".join(registration.parameters) or "none"
            raise ValueError(f"cache {name!r} has no parameter {key!r}; accepted parameters: {accepted}")
        if key in params:
            raise ValueError(f"cache spec {text!r} sets {key!r} twice")
        params[key] = registration.parameters[key].convert(value.strip())
    return CacheSpec(name, params)


def build_cache(spec: CacheSpec | str, config: PreTrainedConfig) -> Cache:
    """A fresh cache for `config` as described by `spec` (a `CacheSpec` or its text)."""
    if isinstance(spec, str):
        spec = parse_cache_spec(spec)
    if spec.name not in _REGISTRY:
        raise ValueError(f"unknown cache {spec.name!r}; registered caches: {', '.join(_REGISTRY)}")
    return _REGISTRY[spec.name].factory(config, **spec.params)


# --- transformers' own caches, as baselines -------------------------------------------------------
def dynamic_cache(config: PreTrainedConfig) -> Cache:
    """transformers' full-precision `DynamicCache`."""
    return DynamicCache(config=config)


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # the parent package is missing
        return False


HF_BACKEND_PACKAGES = {"quanto": ("optimum.quanto", "optimum-quanto"), "hqq": ("hqq", "hqq"), "fp8": (None, None)}


def hf_quantized_cache(
    config: PreTrainedConfig,
    backend: str = "quanto",
    bits: int | None = None,
    group_size: int | None = None,
    residual_length: int | None = None,
) -> Cache:
    """transformers' `QuantizedCache` with the `quanto`, `hqq` or `fp8` backend (its defaults when unset)."""
    if backend not in HF_BACKEND_PACKAGES:
        raise ValueError(f"backend={backend!r} is not supported; accepted values: {', '.join(HF_BACKEND_PACKAGES)}")
    module, package = HF_BACKEND_PACKAGES[backend]
    if module is not None and not _installed(module):
        raise ValueError(f"hf-quantized backend={backend} needs the {package} package: pip install {package}")
    group_wise = {"nbits": bits, "q_group_size": group_size, "residual_length": residual_length}
    if backend == "fp8":
        if any(value is not None for value in group_wise.values()):
            raise ValueError(
                "hf-quantized backend=fp8 quantizes per tensor: it takes no bits, group_size or residual_length"
            )
        return TransformersQuantizedCache("fp8", config)
    return TransformersQuantizedCache(backend, config, **{k: v for k, v in group_wise.items() if v is not None})


register_cache("dynamic", dynamic_cache, "transformers DynamicCache, full precision (the baseline)")
register_cache(
    "hf-quantized",
    hf_quantized_cache,
    "transformers QuantizedCache as a baseline (backend quanto|hqq|fp8)",
)
