"""Per-layer key and value code widths (a bit profile), and the exact choice of widths under a bit budget.

A `BitProfile` gives every model layer its own key width and value width (2, 3, 4 or 8 bits), as chosen by
`hf_kvcache.calibration.bit_profiles.calibrate_bit_profile` from measured per-layer sensitivities, or written by
hand. `QuantizedCache(config, profile=...)` holds each layer at its widths. `choose_bits` is the choice
itself: the widths minimizing the summed sensitivity under a mean-bits budget, exactly (a multiple-choice
knapsack solved by dynamic programming over the integer total of bits).

Source: KVTuner (Li et al. 2025, https://arxiv.org/abs/2502.04420): layer-wise mixed-precision KV
quantization, with key and value widths chosen per layer from their measured sensitivity.
"""

import dataclasses
import json
import math
import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from hf_kvcache.files import read_text_file, write_text_file
from hf_kvcache.quant.packing import SUPPORTED_BITS, check_bits
from hf_kvcache.validation import check_choice, check_int, check_number

FORMAT = "hf_kvcache bit profile"
VERSION = 1
METRICS = ("kl", "nll")
SENSITIVITY_UNIT = {
    "kl": "mean over predicted tokens of KL(full-precision next-token distribution || quantized one), in nats, "
    "when only this layer's keys (key_sensitivity) or only its values (value_sensitivity) are quantized at each "
    "width of `choices`",
    "nll": "mean NLL increase per token (nats) over the full-precision chunked pass when only this layer's keys "
    "(key_sensitivity) or only its values (value_sensitivity) are quantized at each width of `choices`",
}
METRIC_LABEL = {"kl": "KL", "nll": "ΔNLL"}
# The largest profile file read: a profile takes about 200 bytes per layer (thousands of layers fit).
MAX_PROFILE_BYTES = 4 * 1024 * 1024
Table = tuple[tuple[float, ...], ...]  # [layer][index into choices]


def _one_line(match: re.Match) -> str:
    """A JSON list of scalars that `json.dumps(indent=...)` spread over lines, on one line."""
    return "[" + ", ".join(item.strip() for item in match.group(1).split(",\n")) + "]"


def _clip(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def check_choices(choices: Sequence[int], name: str = "choices", ascending: bool = False) -> tuple[int, ...]:
    """`choices` as a sorted tuple of distinct supported widths; a ValueError names the bad entry.

    `ascending=True` where tables are indexed by the choices as given (a profile, `choose_bits`): choices not in
    ascending order are refused rather than sorted, which would attribute each column to another width.
    """
    if isinstance(choices, str | bytes) or not isinstance(choices, Sequence) or not choices:
        raise ValueError(
            f"{name}={_clip(repr(choices), 80)} must be a non-empty sequence of widths from {SUPPORTED_BITS}"
        )
    for index, bits in enumerate(choices):
        check_bits(bits, name=f"{name}[{index}]")
    if len(set(choices)) != len(choices):
        raise ValueError(f"{name}={tuple(choices)!r} lists a width twice")
    if ascending and list(choices) != sorted(choices):
        raise ValueError(
            f"{name}={tuple(choices)!r} must be in ascending order: the sensitivity tables' columns follow the "
            "choices, so reordering them would attribute each measurement to another width"
        )
    return tuple(sorted(choices))


def check_budget(average_bits: float, choices: Sequence[int], name: str = "average_bits") -> None:
    """`average_bits` must lie between the narrowest and the widest of `choices` (inclusive)."""
    check_number(name, average_bits)
    low, high = min(choices), max(choices)
    if not low <= average_bits <= high:
        raise ValueError(
            f"{name}={average_bits!r} must be between {low} and {high}, the narrowest and widest of "
            f"choices={tuple(choices)!r}: no assignment of those widths has that mean"
        )


def _check_table(name: str, table: Sequence[Sequence[float]], layers: int, choices: int) -> Table:
    """`table` [layers][choices] of finite numbers, as nested tuples of floats."""
    if isinstance(table, str) or not isinstance(table, Sequence) or len(table) != layers:
        raise ValueError(f"{name} must hold one row per layer ({layers} rows), got {_clip(repr(table), 80)}")
    rows = []
    for layer, row in enumerate(table):
        if isinstance(row, str) or not isinstance(row, Sequence) or len(row) != choices:
            shown = _clip(repr(row), 80)
            raise ValueError(f"{name}[{layer}]={shown} must hold one number per width of choices ({choices})")
        for index, value in enumerate(row):
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ValueError(f"{name}[{layer}][{index}]={_clip(repr(value), 80)} must be a finite number")
        rows.append(tuple(float(value) for value in row))
    return tuple(rows)


def choose_bits(
    key_sensitivity: Sequence[Sequence[float]],
    value_sensitivity: Sequence[Sequence[float]],
    choices: Sequence[int],
    average_bits: float,
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Per-layer (key widths, value widths) minimizing the summed sensitivity with mean bits <= `average_bits`.

    `key_sensitivity[l][i]` / `value_sensitivity[l][i]`: the loss (e.g. KL or ΔNLL, nats/token) when layer l's keys /
    values are held at `choices[i]` bits. Losses are assumed additive over layers and over keys and values.
    The mean is over layers of (key bits + value bits) / 2, so the budget is an integer total of at most
    floor(2 * layers * average_bits) bits; a dynamic program over that total is exact (a multiple-choice
    knapsack with one group of len(choices)**2 (key, value) options per layer). Ties go to fewer bits.

    Raises:
        ValueError: bad `choices` (not distinct supported widths in ascending order: the tables' columns follow
            them); an `average_bits` outside [min(choices), max(choices)]; tables not shaped [layers][len(choices)]
            or holding a non-finite number.
    """
    choices = check_choices(choices, ascending=True)
    check_budget(average_bits, choices)
    keys = _check_table("key_sensitivity", key_sensitivity, len(key_sensitivity), len(choices))
    values = _check_table("value_sensitivity", value_sensitivity, len(keys), len(choices))
    layers = len(keys)
    capacity = math.floor(2 * layers * average_bits + 1e-9)
    # best[c]: (least loss, per-layer (key, value) option indices) over the layers so far, using exactly c bits.
    best: dict[int, tuple[float, tuple[tuple[int, int], ...]]] = {0: (0.0, ())}
    for layer in range(layers):
        options = sorted(
            (
                (choices[k] + choices[v], keys[layer][k] + values[layer][v], (k, v))
                for k in range(len(choices))
                for v in range(len(choices))
            ),
            key=lambda option: option[0],
        )
        following: dict[int, tuple[float, tuple[tuple[int, int], ...]]] = {}
        for used, (loss, picked) in sorted(best.items()):
            for cost, option_loss, pair in options:
                total = used + cost
                if total > capacity:
                    break
                candidate = loss + option_loss
                if total not in following or candidate < following[total][0]:
                    following[total] = (candidate, (*picked, pair))
        best = following
    least = min(loss for loss, _ in best.values())
    picked = next(picked for _, (loss, picked) in sorted(best.items()) if loss == least)  # fewest bits among ties
    return tuple(choices[k] for k, _ in picked), tuple(choices[v] for _, v in picked)


def summed_sensitivity(
    profile_bits: tuple[Sequence[int], Sequence[int]],
    key_sensitivity: Sequence[Sequence[float]],
    value_sensitivity: Sequence[Sequence[float]],
    choices: Sequence[int],
) -> float:
    """The additive estimate of the loss of (key widths, value widths): the sum of their table entries."""
    position = {bits: index for index, bits in enumerate(choices)}
    key_bits, value_bits = profile_bits
    return sum(
        key_sensitivity[layer][position[k]] + value_sensitivity[layer][position[v]]
        for layer, (k, v) in enumerate(zip(key_bits, value_bits))
    )


def _finite(value: object) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class BitProfile:
    """Every model layer's key and value code widths, and how they were chosen.

    Args:
        key_bits, value_bits: one width per model layer (2, 3, 4 or 8), in model order.
        model: the model it was calibrated for (hub id, folder or model type); informative.
        choices: the widths whose sensitivities were measured (empty for a hand-written profile).
        metric: what the sensitivities measure: "kl" or "nll" (see `SENSITIVITY_UNIT` and
            `hf_kvcache.calibration.bit_profiles`).
        key_sensitivity, value_sensitivity: [layer][index into choices] `metric` in nats per token, or None
            for a hand-written profile.
        cache_settings: the `QuantizedCache` settings the sensitivities were measured with (group_size,
            key_group_size, residual_length, sink_tokens, rotate, ...); `QuantizedCache(profile=...)` warns
            when its own settings differ.
        budget_bits: the mean-bits budget the widths were chosen under (None: hand-written).
        source: the calibration text (dataset name and where it came from); tokens: its length in tokens;
            chunk: tokens per forward in the calibration passes; reference_nll: the full-precision mean NLL;
            seconds: how long the calibration took.

    `average_bits` is the unweighted mean over layers of (key bits + value bits) / 2: the mean code width
    per stored element when key and value heads have the same channel count (every model but multi-head
    latent attention). Code widths only: scales, minimums and the full-precision residual come on top.

    Source: KVTuner, https://arxiv.org/abs/2502.04420.

    Raises:
        ValueError: a width that is not 2, 3, 4 or 8 (named by field and layer, e.g. `key_bits[3]=5`), key and
            value widths of different lengths, no layer, `choices` not distinct widths in ascending order,
            sensitivity tables not shaped [layers][choices] or not finite, a `budget_bits` outside the choices'
            range, a non-finite `reference_nll` or `seconds`, `cache_settings` not a dict of named scalars,
            `model` or `source` not text (each named).
    """

    key_bits: tuple[int, ...]
    value_bits: tuple[int, ...]
    model: str = ""
    choices: tuple[int, ...] = ()
    metric: str = "kl"
    key_sensitivity: Table | None = None
    value_sensitivity: Table | None = None
    cache_settings: dict[str, object] = field(default_factory=dict)
    budget_bits: float | None = None
    source: str = ""
    tokens: int = 0
    chunk: int = 0
    reference_nll: float | None = None
    seconds: float | None = None

    def __post_init__(self) -> None:
        for name in ("key_bits", "value_bits"):
            widths = getattr(self, name)
            if isinstance(widths, str) or not isinstance(widths, Sequence) or not widths:
                raise ValueError(f"{name}={widths!r} must be a non-empty sequence of widths, one per model layer")
            for layer, bits in enumerate(widths):
                check_bits(bits, name=f"{name}[{layer}]")
            object.__setattr__(self, name, tuple(widths))
        if len(self.key_bits) != len(self.value_bits):
            raise ValueError(
                f"key_bits has {len(self.key_bits)} layers but value_bits has {len(self.value_bits)}: "
                "give one key width and one value width per model layer"
            )
        if isinstance(self.choices, str | bytes) or not isinstance(self.choices, Sequence):
            raise ValueError(f"choices={_clip(repr(self.choices), 80)} must be a sequence of widths (empty: none)")
        choices = check_choices(self.choices, ascending=True) if len(self.choices) else ()
        object.__setattr__(self, "choices", choices)
        check_choice("metric", self.metric, METRICS)
        for name in ("key_sensitivity", "value_sensitivity"):
            table = getattr(self, name)
            if table is not None:
                if not self.choices:
                    raise ValueError(f"{name} needs the `choices` its columns were measured at")
                object.__setattr__(self, name, _check_table(name, table, self.num_layers, len(self.choices)))
        if not isinstance(self.cache_settings, dict):
            shown = _clip(repr(self.cache_settings), 80)
            raise ValueError(f"cache_settings={shown} must be a dict of QuantizedCache settings")
        for name, value in self.cache_settings.items():
            scalar = value is None or isinstance(value, str | bool | int) or _finite(value)
            if not isinstance(name, str) or not name or not scalar:
                raise ValueError(
                    f"cache_settings[{_clip(repr(name), 40)}]={_clip(repr(value), 80)}: every setting must be named "
                    "and hold text, a finite number, true/false or null"
                )
        if self.budget_bits is not None:
            if not _finite(self.budget_bits):
                raise ValueError(f"budget_bits={self.budget_bits!r} must be a finite number or None (hand-written)")
            check_budget(self.budget_bits, self.choices or SUPPORTED_BITS, name="budget_bits")
        for name in ("model", "source"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name}={_clip(repr(getattr(self, name)), 80)} must be text")
        for name in ("reference_nll", "seconds"):
            value = getattr(self, name)
            if value is not None and not (_finite(value) and value >= 0):
                raise ValueError(f"{name}={_clip(repr(value), 80)} must be a finite number >= 0, or None")
        check_int("tokens", self.tokens)
        check_int("chunk", self.chunk)

    @property
    def num_layers(self) -> int:
        return len(self.key_bits)

    @property
    def average_bits(self) -> float:
        """Mean over layers of (key bits + value bits) / 2, unweighted by channel counts."""
        return (sum(self.key_bits) + sum(self.value_bits)) / (2 * self.num_layers)

    @property
    def estimated_loss(self) -> float | None:
        """The additive estimate of this profile's `metric` (nats/token): its widths' summed sensitivities."""
        if self.key_sensitivity is None or self.value_sensitivity is None:
            return None
        return summed_sensitivity(
            (self.key_bits, self.value_bits), self.key_sensitivity, self.value_sensitivity, self.choices
        )

    @classmethod
    def uniform(cls, num_layers: int, bits: int, key_bits: int | None = None) -> "BitProfile":
        """The same widths in every layer (`key_bits` None: `bits`), as a hand-written profile."""
        check_int("num_layers", num_layers, minimum=1)
        return cls((bits if key_bits is None else key_bits,) * num_layers, (bits,) * num_layers)

    def with_budget(self, average_bits: float, choices: Sequence[int] | None = None) -> "BitProfile":
        """The widths chosen again from this profile's measured sensitivities under another budget (no passes).

        `choices`: a subset of the measured widths (default: all of them).
        """
        if self.key_sensitivity is None or self.value_sensitivity is None:
            raise ValueError("this profile holds no measured sensitivities to choose widths from (hand-written)")
        choices = self.choices if choices is None else check_choices(choices)
        unmeasured = sorted(set(choices) - set(self.choices))
        if unmeasured:
            raise ValueError(
                f"choices={choices!r}: width(s) {unmeasured} were not measured; measured widths: {self.choices}"
            )
        columns = [self.choices.index(bits) for bits in choices]
        keys, values = (
            [[row[i] for i in columns] for row in table] for table in (self.key_sensitivity, self.value_sensitivity)
        )
        key_bits, value_bits = choose_bits(keys, values, choices, average_bits)
        return dataclasses.replace(self, key_bits=key_bits, value_bits=value_bits, budget_bits=average_bits)

    def layer_rows(self) -> list[dict]:
        """One row per layer (widths and sensitivities), for `hf_kvcache.report.format_table`."""
        rows = []
        for layer in range(self.num_layers):
            row: dict[str, object] = {"layer": layer}
            for name, table in (("K", self.key_sensitivity), ("V", self.value_sensitivity)):
                for index, bits in enumerate(self.choices if table is not None else ()):
                    row[f"{METRIC_LABEL[self.metric]} {name}{bits}"] = table[layer][index]
            row["key bits"], row["value bits"] = self.key_bits[layer], self.value_bits[layer]
            rows.append(row)
        return rows

    # --- JSON -------------------------------------------------------------------------------------
    def to_json(self) -> str:
        """Human-readable JSON: the settings, then one line per layer."""
        head = {
            "format": FORMAT,
            "version": VERSION,
            "model": self.model,
            "num_layers": self.num_layers,
            "average_bits": self.average_bits,
            "budget_bits": self.budget_bits,
            "choices": list(self.choices),
            "metric": self.metric,
            "cache_settings": self.cache_settings,
            "calibration": {
                "source": self.source,
                "tokens": self.tokens,
                "chunk": self.chunk,
                "reference_nll": self.reference_nll,
                "seconds": self.seconds,
            },
            "estimated_loss": self.estimated_loss,
            "sensitivity_unit": SENSITIVITY_UNIT[self.metric],
        }
        rows = []
        for layer in range(self.num_layers):
            row = {"layer": layer, "key_bits": self.key_bits[layer], "value_bits": self.value_bits[layer]}
            if self.key_sensitivity is not None:
                row["key_sensitivity"] = list(self.key_sensitivity[layer])
            if self.value_sensitivity is not None:
                row["value_sensitivity"] = list(self.value_sensitivity[layer])
            rows.append("    " + json.dumps(row))
        text = re.sub(r"\[\n\s+([^\[\]{}]*?)\n\s*\]", _one_line, json.dumps(head, indent=2, ensure_ascii=False))
        return text[: text.rindex("}")].rstrip() + ',\n  "layers": [\n' + ",\n".join(rows) + "\n  ]\n}\n"

    def save(self, path: str | os.PathLike) -> Path:
        """Write `to_json()` to `path` (parent folders created); returns the path."""
        return write_text_file(path, self.to_json())

    @classmethod
    def from_json(cls, text: str, origin: str = "profile") -> "BitProfile":
        """Inverse of `to_json`. Every field is checked by type and range (`BitProfile`'s own checks, plus: the
        layers a list of objects numbered 0, 1, ... once each, `num_layers` when present equal to their
        count, a sensitivity table in every layer or in none, `choices` a list, `calibration` an object); the
        derived `average_bits`, `estimated_loss` and `sensitivity_unit` are not read.

        Raises:
            ValueError: not JSON (also nested too deeply, or a number too long), not a bit profile, another
                version, or a missing or bad field; the message names `origin` and the field.
        """
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as error:  # JSONDecodeError, or an integer of over 4300 digits
            reason = "nested too deeply" if isinstance(error, RecursionError) else _clip(str(error), 200)
            raise ValueError(f"{origin}: not JSON ({reason})") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f'{origin}: not a bit profile (no "format": "{FORMAT}" field)')
        version = data.get("version")
        if type(version) is not int or version != VERSION:
            raise ValueError(f"{origin}: bit profile version {_clip(repr(version), 40)}; this package reads {VERSION}")
        try:
            layers = data["layers"]
            calibration = data.get("calibration", {})
            if not isinstance(layers, list) or not all(isinstance(row, dict) for row in layers):
                raise ValueError("layers must be a list of objects, one per layer")
            if not isinstance(calibration, dict):
                raise ValueError(f"calibration={_clip(repr(calibration), 80)} must be an object")
            numbers = [row["layer"] for row in layers]
            if any(type(number) is not int for number in numbers) or sorted(numbers) != list(range(len(numbers))):
                raise ValueError(
                    f"layers must be numbered 0, 1, ... once each without gaps, got {_clip(repr(numbers), 80)}"
                )
            rows = sorted(layers, key=lambda row: row["layer"])
            count = data.get("num_layers", len(rows))
            if type(count) is not int or count != len(rows):
                raise ValueError(f"num_layers={_clip(repr(count), 40)} but the file lists {len(rows)} layers")
            tables = {}
            for name in ("key_sensitivity", "value_sensitivity"):
                holding = [row["layer"] for row in rows if name in row]
                if holding and len(holding) != len(rows):
                    missing = sorted(set(range(len(rows))) - set(holding))
                    raise ValueError(f"{name} is given for some layers but not for layer(s) {_clip(repr(missing), 80)}")
                tables[name] = [row[name] for row in rows] if holding else None
            choices = data.get("choices", [])
            if not isinstance(choices, list):
                raise ValueError(f"choices={_clip(repr(choices), 80)} must be a list of widths")
            return cls(
                key_bits=tuple(row["key_bits"] for row in rows),
                value_bits=tuple(row["value_bits"] for row in rows),
                model=data.get("model", ""),
                choices=tuple(choices),
                metric=data.get("metric", "kl"),
                **tables,
                cache_settings=data.get("cache_settings", {}),
                budget_bits=data.get("budget_bits"),
                source=calibration.get("source", ""),
                tokens=calibration.get("tokens", 0),
                chunk=calibration.get("chunk", 0),
                reference_nll=calibration.get("reference_nll"),
                seconds=calibration.get("seconds"),
            )
        except KeyError as error:
            raise ValueError(f"{origin}: missing field {_clip(str(error), 80)}") from None
        except RecursionError:
            raise ValueError(f"{origin}: a field is nested too deeply") from None
        except (TypeError, ValueError, AttributeError) as error:
            raise ValueError(f"{origin}: {_clip(str(error))}") from None

    @classmethod
    def load(cls, path: str | os.PathLike) -> "BitProfile":
        """Read a profile written by `save`, as untrusted input: only a regular file (no FIFO, device or
        folder) of at most `MAX_PROFILE_BYTES` (4 MiB), UTF-8 JSON, every field checked (`from_json`).

        Raises:
            OSError (FileNotFoundError, PermissionError, ...): the file cannot be opened; the message names it.
            ValueError: anything else (`files.UnsafeFile` for a FIFO, device, folder or oversized file; not
                UTF-8, not JSON, nested too deeply, a bad field); the message names the file.
        """
        text = read_text_file(path, MAX_PROFILE_BYTES, "bit profile")
        return cls.from_json(text, origin=f"bit profile {os.fspath(path)}")


def profile_for_cache(
    profile: "BitProfile | str | os.PathLike | None",
    num_layers: int,
    key_bits: int | None,
    settings: dict[str, object],
) -> BitProfile | None:
    """The `profile` argument of `QuantizedCache`, checked against the cache: loaded if a path, refused for
    another layer count than the config's `num_layers` or together with `key_bits`, and a `UserWarning`
    naming every setting of `settings` that differs from those the profile was calibrated with (the widths
    still apply: a sensitivity ranking measured at one residual length is a fair guess at another).
    """
    if profile is None:
        return None
    if isinstance(profile, str | os.PathLike):
        origin = f"profile={os.fspath(profile)!r}"
        profile = BitProfile.load(profile)
    elif isinstance(profile, BitProfile):
        origin = "profile"
    else:
        raise ValueError(f"profile={profile!r} must be a BitProfile, the path of its JSON file, or None")
    if profile.num_layers != num_layers:
        raise ValueError(
            f"{origin} gives widths for {profile.num_layers} layers (calibrated for "
            f"{profile.model or 'another model'}), but the config has {num_layers} layers: calibrate a profile for "
            "this model (hf-kvcache calibrate)"
        )
    if key_bits is not None:
        raise ValueError(
            f"key_bits={key_bits!r} and {origin}: the profile sets every layer's key width; pass one of them"
        )
    differences = [
        f"{name}={profile.cache_settings[name]!r} (cache: {value!r})"
        for name, value in settings.items()
        if name in profile.cache_settings and profile.cache_settings[name] != value
    ]
    if differences:
        warnings.warn(
            f"{origin} was calibrated with {', '.join(differences)}; its widths are used as they are. "
            "Pass the profile's settings to the cache to use it as calibrated.",
            UserWarning,
            stacklevel=3,
        )
    return profile
