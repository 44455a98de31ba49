"""Every causal-LM model type of the installed transformers, every cache kind: served or refused.

For each model type in transformers' causal-LM auto mapping, the default config is shrunk to a tiny one
(sizes only; each layer kind it has is kept), and every cache kind is built from it. A cache is *served*
(constructed) or *refused* (a ValueError naming the layer and why); anything else is a crash. Where the tiny
model builds and runs with `DynamicCache`, each served cache is run on it (a prefill of 8, then 4 single
tokens, nothing evicted) and compared with `DynamicCache`: equal to float rounding in full precision, within
`QUANTIZED_TOLERANCE` at 8 bits.

`tests/caches/test_model_types.py` runs it; `python tests/model_type_matrix.py` writes the table of
`docs/model-types.md`.
"""

import contextlib
import io
import re
import sys
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from helpers import prefill_then_tokens
from transformers import CONFIG_MAPPING, AutoModelForCausalLM, DynamicCache
from transformers.cache_utils import get_layer_types_and_kwargs
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from hf_kvcache import HeavyHitterCache, QuantizedCache, SinkCache, SlidingWindowCache, enable_score_capture
from hf_kvcache.scoring import ScoreCaptureError

QUANTIZED_TOLERANCE = 0.05  # max |logit difference| at 8 bits (group 4, residual 4) on random tiny models
CACHE_KINDS = {
    "quantized-8bit": lambda config: QuantizedCache(config, bits=8, group_size=4, residual_length=4, sink_tokens=2),
    "window": lambda config: SlidingWindowCache(config, window=64),
    "sink": lambda config: SinkCache(config, sink_tokens=4, window=60),
    "h2o": lambda config: HeavyHitterCache(config, budget=64),
}
# Sizes of a tiny model, by config attribute (transformers' attribute maps take the generic names).
_SIZES = {
    "vocab_size": 256,
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "global_head_dim": 32,
    "num_experts": 4,
    "num_local_experts": 4,
    "n_routed_experts": 4,
    "moe_num_experts": 4,
    "num_experts_per_tok": 2,
    "moe_topk": 2,
    "n_shared_experts": 1,
    "kv_lora_rank": 32,
    "q_lora_rank": None,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 16,
    "v_head_dim": 16,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "linear_key_head_dim": 16,
    "linear_value_head_dim": 16,
    "max_position_embeddings": 512,
    "hidden_size_per_layer_input": 16,
    "vocab_size_per_layer_input": 256,
}
_SPECIAL_TOKENS = ("bos_token_id", "eos_token_id", "pad_token_id")


@dataclass
class Cell:
    """One model type x cache kind: `outcome` is served, refused or crashed; `detail` the reason or error;
    `equal` whether a run equalled DynamicCache (None: not run, the tiny model did not build)."""

    outcome: str
    detail: str = ""
    equal: bool | None = None


def _tiny_settings(text: transformers.PreTrainedConfig) -> dict:
    """Tiny sizes for the attributes `text` has, and as many layers as it takes to keep each of its layer kinds."""
    kinds, _ = get_layer_types_and_kwargs(text)
    layers = max(2, max(kinds.index(kind) for kind in set(kinds)) + 1)
    settings = text.to_dict()
    names = {name: text.attribute_map.get(name, name) for name in _SIZES}  # GPT-2's n_embd, BART's d_model, ...
    tiny = {names[name]: value for name, value in _SIZES.items() if settings.get(names[name]) is not None}
    if settings.get("multi_query"):  # one KV head, whatever num_key_value_heads says
        tiny.pop("num_key_value_heads", None)
    tiny |= {
        name: 128 for name, value in settings.items() if ("intermediate_size" in name or "ffn_dim" in name) and value
    }
    tiny |= {name: 4 for name in ("encoder_attention_heads", "decoder_attention_heads") if name in settings}
    tiny |= {name: 2 for name in ("encoder_layers", "decoder_layers") if name in settings}
    tiny |= {name: 2 for name in _SPECIAL_TOKENS if isinstance(settings.get(name), int) and settings[name] >= 256}
    if settings.get("rotary_dim"):
        tiny["rotary_dim"] = 8
    if settings.get("qk_rope_head_dim") and "head_dim" in tiny:  # latent attention: head_dim is the rotary part
        tiny["head_dim"] = tiny["qk_rope_head_dim"]
    tiny["num_hidden_layers"] = layers
    if isinstance(settings.get("layer_types"), list):
        tiny["layer_types"] = settings["layer_types"][:layers]
    return tiny


def shrunk(model_type: str) -> list[transformers.PreTrainedConfig]:
    """Tiny versions of the model type's default config, two ways: rebuilt from its settings with tiny sizes
    (derived sizes follow), and the default with tiny sizes set in place (for configs whose validators refuse
    a rebuild). A composite config gets its text config shrunk."""
    variants = []
    for rebuild in (True, False):
        config = CONFIG_MAPPING[model_type]()
        text = config.get_text_config(decoder=True)
        if not any(value is text for value in vars(config).values()):  # a view (encoder-decoder): shrink the whole
            text = config
        tiny = _tiny_settings(text)
        if rebuild:
            try:
                new_text = type(text)(**{**text.to_dict(), **tiny})
            except Exception:  # a validator refused the rebuilt settings
                continue
        else:
            new_text = text
            for name, value in tiny.items():
                with contextlib.suppress(AttributeError):  # derived properties have no setter
                    setattr(text, name, value)
        if text is config:
            config = new_text
        for name, value in list(vars(config).items()):
            if value is text:
                setattr(config, name, new_text)
        variants.append(config)
    return variants


def model_types() -> list[str]:
    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


@contextlib.contextmanager
def _quiet():
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        verbosity = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()
        try:
            yield
        finally:
            transformers.logging.set_verbosity(verbosity)


def _tiny_model(model_type: str):
    """A tiny eager model of `model_type`, 12 token ids and DynamicCache's logits on them, or None if no shrunk
    config builds and runs (a limit of `shrunk`, not of the caches)."""
    ids = torch.randint(3, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    try:
        variants = shrunk(model_type)
    except Exception:  # the config cannot be shrunk
        return None
    for config in variants:
        try:
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
            return model, ids, prefill_then_tokens(model, ids, DynamicCache(config=model.config))
        except Exception:  # any failure here is the shrunk config's
            continue
    return None


def _first_line(error: BaseException) -> str:
    return re.sub(r"\s+", " ", str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__)


def model_type_row(model_type: str, run: bool = True) -> dict[str, Cell]:
    """Every cache kind's cell for `model_type` (an empty dict when its default config cannot be built)."""
    with _quiet():
        try:
            config = CONFIG_MAPPING[model_type]()
        except Exception:  # transformers' own default config is invalid (e.g. gemma4_assistant)
            return {}
        if getattr(config, "is_encoder_decoder", False):  # its ...ForCausalLM runs the decoder alone, so marked
            config.is_encoder_decoder, config.is_decoder = False, True
        refused = {}
        for kind, make in CACHE_KINDS.items():  # the default config first: no model is built for refused types
            try:
                make(config)
            except ValueError as error:
                refused[kind] = Cell("refused", _first_line(error))
            except Exception as error:  # a crash is what the matrix looks for
                refused[kind] = Cell("crashed", f"{type(error).__name__}: {_first_line(error)}")
        if len(refused) == len(CACHE_KINDS):
            return refused
        tiny = _tiny_model(model_type) if run else None
        row = {}
        for kind, make in CACHE_KINDS.items():
            target = tiny[0].config if tiny else config
            try:
                if kind == "h2o" and tiny:
                    enable_score_capture(tiny[0])
                cache = make(target)
            except ValueError as error:
                row[kind] = Cell("refused", _first_line(error))
                continue
            except Exception as error:  # a crash on the tiny config
                row[kind] = Cell("crashed", f"{type(error).__name__}: {_first_line(error)}")
                continue
            if tiny is None:
                row[kind] = Cell("served")
                continue
            model, ids, expected = tiny
            try:
                actual = prefill_then_tokens(model, ids, cache)
            except (ValueError, ScoreCaptureError) as error:  # refused when the model first runs
                row[kind] = Cell("refused", f"at the first forward: {_first_line(error)}")
                continue
            except Exception as error:  # a crash while running
                row[kind] = Cell("crashed", f"{type(error).__name__} while running: {_first_line(error)}")
                continue
            difference = (actual - expected).abs().max().item()
            tolerance = QUANTIZED_TOLERANCE if kind.startswith("quantized") else 2e-5 + 1e-4 * expected.abs().max()
            row[kind] = Cell("served", f"max |dlogit| {difference:.2g}", bool(difference <= tolerance))
        return row


def counts(matrix: dict[str, dict[str, Cell]]) -> dict[str, Counter]:
    """Per cache kind: how many model types are served (run and equal / not run), refused, crashed, unequal."""
    by_kind = {kind: Counter() for kind in CACHE_KINDS}
    for row in matrix.values():
        for kind, cell in row.items():
            label = cell.outcome
            if cell.outcome == "served":
                label = {True: "served, equal", False: "served, UNEQUAL", None: "served, not run"}[cell.equal]
            by_kind[kind][label] += 1
    return by_kind


def markdown(matrix: dict[str, dict[str, Cell]]) -> str:
    lines = [
        "# Model types x cache kinds",
        "",
        f"Generated by `python tests/model_type_matrix.py` on transformers {transformers.__version__}: every model "
        "type of transformers' causal-LM auto mapping, its default config shrunk to a tiny model (each layer kind "
        "kept). *served, equal*: constructed, run (prefill of 8, 4 single tokens, eager attention) and equal to "
        "`DynamicCache` (8-bit within "
        f"{QUANTIZED_TOLERANCE}); *served, not run*: constructed from the full default config, but the shrunk "
        "config does not build or run (a limit of the shrinking, not of the cache); *refused*: a ValueError "
        "naming the layer and why.",
        "",
        "| cache kind | " + " | ".join(sorted({label for c in counts(matrix).values() for label in c})) + " |",
    ]
    labels = sorted({label for c in counts(matrix).values() for label in c})
    lines.append("| --- |" + " --- |" * len(labels))
    for kind, c in counts(matrix).items():
        lines.append(f"| {kind} | " + " | ".join(str(c.get(label, 0)) for label in labels) + " |")
    lines += ["", "| model type | " + " | ".join(CACHE_KINDS) + " |", "| --- |" + " --- |" * len(CACHE_KINDS)]
    for model_type, row in matrix.items():
        if not row:
            lines.append(f"| {model_type} |" + " transformers' default config does not build |" * len(CACHE_KINDS))
            continue
        cells = []
        for kind in CACHE_KINDS:
            cell = row[kind]
            text = cell.outcome if cell.equal is None else ("=" if cell.equal else f"UNEQUAL ({cell.detail})")
            if cell.outcome != "served":
                text += f": {cell.detail[:160]}".replace("|", "/")
            cells.append(text)
        lines.append(f"| {model_type} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    torch.set_num_threads(1)
    full = {model_type: model_type_row(model_type) for model_type in model_types()}
    out = Path(__file__).resolve().parents[1] / "docs" / "model-types.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text(markdown(full), encoding="utf-8")
    for kind, c in counts(full).items():
        print(kind, dict(c), file=sys.stdout)
    print(f"wrote {out}")
