"""Result records of an evaluation run, and their table, JSON and CSV forms."""

import csv
import dataclasses
import hashlib
import json
import logging
import math
import os
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TypeVar

from hf_kvcache.eval.perplexity import perplexity_of
from hf_kvcache.files import read_regular_file
from hf_kvcache.registry import parse_cache_spec
from hf_kvcache.report import format_table

logger = logging.getLogger(__name__)

T = TypeVar("T")

PARTIAL_MAX_BYTES = 64 * 2**20  # default cap on one partial result file (about a million tokens of NLLs)

RATIO_FIGURES = ("perplexity", "cache_bytes", "peak_memory_bytes", "prefill_tokens_per_s", "decode_tokens_per_s")
CSV_COLUMNS = (
    "cache",
    "tokens",
    "perplexity",
    "mean_nll",
    "cache_bytes",
    "peak_memory_bytes",
    "peak_memory_kind",
    "prefill_tokens_per_s",
    "decode_tokens_per_s",
    *(f"{figure}_ratio" for figure in RATIO_FIGURES),
)


@dataclass
class CacheResult:
    """Everything measured for one cache spec.

    `tokens` is the number of predicted tokens (the text length minus one); `nll[i]` is the NLL of
    token i + 1; `bucket_perplexity[b]` covers predicted tokens `b * bucket_size` up to the next bucket;
    `memory_positions[i]` tokens had been fed when the cache held `memory_bytes[i]` bytes;
    `ratios` divide each figure of `RATIO_FIGURES` by the first cache's.
    """

    cache: str
    spec: dict
    tokens: int
    perplexity: float
    mean_nll: float
    bucket_size: int
    bucket_perplexity: list[float]
    nll: list[float]
    memory_positions: list[int]
    memory_bytes: list[int]
    cache_bytes: int
    peak_memory_bytes: int
    peak_memory_kind: str
    prefill_tokens_per_s: float | None
    decode_tokens_per_s: float
    ratios: dict[str, float | None] = field(default_factory=dict)

    @classmethod
    def from_record(cls, record: object, label: str, settings: Mapping) -> "CacheResult":
        """The result a partial file holds, checked field by field against what a measurement of `label`
        under `settings` (`mode`, `chunk_size`, `max_tokens`, `segment_tokens`) produces: a tampered or
        damaged record must never be reported as measured.

        Raises:
            ValueError: the first field that is missing, of the wrong type, out of range or inconsistent.
        """
        fields = exact_fields(cls, record)
        if fields["cache"] != label:
            raise ValueError(f"cache={fields['cache']!r} but the file is that of {label!r}")
        check_spec(fields["spec"], label)
        tokens = record_int("tokens", fields["tokens"], 1)
        if isinstance(settings.get("max_tokens"), int) and tokens != settings["max_tokens"] - 1:
            raise ValueError(f"tokens={tokens!r} but --max-tokens {settings['max_tokens']} predicts one fewer")
        nll = record_list("nll", fields["nll"], tokens)
        for value in nll:
            record_number("nll", value, 0.0)
        mean_nll = record_number("mean_nll", fields["mean_nll"], 0.0)
        check_close("mean_nll", mean_nll, math.fsum(nll) / tokens)
        perplexity = fields["perplexity"]
        if not (isinstance(perplexity, float | int) and not isinstance(perplexity, bool) and perplexity >= 1):
            raise ValueError(f"perplexity={perplexity!r}: accepted: a number >= 1 (exp of a mean NLL >= 0)")
        check_close("perplexity", perplexity, perplexity_of(mean_nll))
        bucket_size = record_int("bucket_size", fields["bucket_size"], 1)
        segment = settings.get("segment_tokens", bucket_size)
        expected_size = max(1, min(256, tokens // 8)) if segment is None else segment  # evaluate's default
        if bucket_size != expected_size:
            raise ValueError(f"bucket_size={bucket_size!r} but this run's segments are of {expected_size!r} tokens")
        buckets = record_list("bucket_perplexity", fields["bucket_perplexity"], -(-tokens // bucket_size))
        for index, value in enumerate(buckets):
            part = nll[index * bucket_size : (index + 1) * bucket_size]
            check_close("bucket_perplexity", value, perplexity_of(math.fsum(part) / len(part)))
        step = settings.get("chunk_size") if settings.get("mode", "chunk") == "chunk" else 1
        positions = record_list("memory_positions", fields["memory_positions"])
        for value in positions:
            record_int("memory_positions", value, 1)
        if isinstance(step, int) and step >= 1:
            expected = [min(start + step, tokens + 1) for start in range(0, tokens + 1, step)]
            if positions != expected:
                raise ValueError(f"memory_positions are not the {len(expected)} steps of {step} token(s) measured")
        held = record_list("memory_bytes", fields["memory_bytes"], len(positions))
        for value in held:
            record_int("memory_bytes", value, 0)
        if not held or record_int("cache_bytes", fields["cache_bytes"], 0) != held[-1]:
            raise ValueError(f"cache_bytes={fields['cache_bytes']!r} is not the last of memory_bytes")
        record_int("peak_memory_bytes", fields["peak_memory_bytes"], 0)
        if fields["peak_memory_kind"] not in ("rss", "cuda_max_allocated"):
            raise ValueError(f"peak_memory_kind={fields['peak_memory_kind']!r}: accepted: rss, cuda_max_allocated")
        prefill = fields["prefill_tokens_per_s"]
        if settings.get("mode", "chunk") == "token":
            if prefill is not None:
                raise ValueError(f"prefill_tokens_per_s={prefill!r} but token mode measures no prefill speed")
        else:
            record_number("prefill_tokens_per_s", prefill, 0.0, inclusive=False)
        record_number("decode_tokens_per_s", fields["decode_tokens_per_s"], 0.0, inclusive=False)
        if not isinstance(fields["ratios"], dict):
            raise ValueError(f"ratios={fields['ratios']!r}: accepted: a mapping")
        return cls(**{**fields, "ratios": {}})  # ratios are recomputed for the run that reuses the result


def exact_fields(kind: type, record: object) -> dict:
    """`record` as the keyword arguments of dataclass `kind`: a JSON object with exactly its fields."""
    if not isinstance(record, dict):
        raise ValueError(f"result={type(record).__name__}: accepted: a JSON object")
    names = {item.name for item in dataclasses.fields(kind)}
    missing, unknown = sorted(names - set(record)), sorted(set(record) - names)
    if missing or unknown:
        raise ValueError(f"fields missing: {', '.join(missing) or '-'}; unknown fields: {', '.join(unknown) or '-'}")
    return dict(record)


def check_spec(spec: object, label: str) -> None:
    """`spec` must be the parsed form of the cache `label` the file is saved under."""
    parsed = parse_cache_spec(label)
    if spec != {"name": parsed.name, "params": json.loads(json.dumps(dict(parsed.params), default=str))}:
        raise ValueError(f"spec={spec!r} is not that of cache {label!r}")


def record_int(name: str, value: object, minimum: int) -> int:
    """An integer field (not a bool) >= minimum."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name}={value!r}: accepted: an integer >= {minimum}")
    return value


def record_number(name: str, value: object, minimum: float, inclusive: bool = True) -> float:
    """A finite number field (not a bool) >= minimum (or > it)."""
    valid = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not valid or value < minimum or (not inclusive and value == minimum):
        raise ValueError(f"{name}={value!r}: accepted: a finite number {'>=' if inclusive else '>'} {minimum}")
    return float(value)


def record_list(name: str, value: object, length: int | None = None) -> list:
    """A list field, of `length` items when given."""
    if not isinstance(value, list) or (length is not None and len(value) != length):
        shown = f"a list of {type(value).__name__}" if not isinstance(value, list) else f"{len(value)} items"
        raise ValueError(f"{name}: {shown}; accepted: a list{f' of {length} items' if length is not None else ''}")
    return value


def check_close(name: str, value: object, expected: float) -> None:
    """A derived figure must equal what its parts give (NaN and a planted number are refused)."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise ValueError(f"{name}={value!r}: accepted: a number")
    if not (value == expected or math.isclose(value, expected, rel_tol=1e-6, abs_tol=1e-12)):
        raise ValueError(f"{name}={value!r} is not what the record's own figures give ({expected!r})")


@dataclass
class EvalResults:
    """A whole run: its settings, where the data came from, library versions, one result per cache, and how
    the work was split (`distribution`: `num_processes`, per process its device and caches, `reused` results
    of an interrupted run)."""

    model: str
    dataset: str
    data_source: str
    mode: str
    chunk_size: int | None
    max_tokens: int
    decode_tokens: int
    seed: int
    device: str
    dtype: str
    versions: dict[str, str]
    results: list[CacheResult]
    distribution: dict = field(default_factory=dict)  # processes, their devices and caches; reused results

    def fill_ratios(self) -> None:
        """Set each result's ratios to the first cache of the run."""
        base = self.results[0]
        for result in self.results:
            for figure in RATIO_FIGURES:
                value, reference = getattr(result, figure), getattr(base, figure)
                result.ratios[figure] = None if value is None or not reference else value / reference

    def table_rows(self) -> list[dict]:
        rows = []
        for r in self.results:
            rows.append(
                {
                    "cache": r.cache,
                    "ppl": r.perplexity,
                    "ppl x": r.ratios["perplexity"],
                    "cache MiB": r.cache_bytes / 2**20,
                    "bytes x": r.ratios["cache_bytes"],
                    "peak MiB": r.peak_memory_bytes / 2**20,
                    "prefill tok/s": "-" if r.prefill_tokens_per_s is None else r.prefill_tokens_per_s,
                    "prefill x": "-" if r.ratios["prefill_tokens_per_s"] is None else r.ratios["prefill_tokens_per_s"],
                    "decode tok/s": r.decode_tokens_per_s,
                    "decode x": r.ratios["decode_tokens_per_s"],
                }
            )
        return rows

    def segment_rows(self) -> list[dict]:
        """Per segment of `bucket_size` predicted tokens: each cache's perplexity there and the MiB it held
        when the segment ended (flat for a streaming cache, growing for a dense one)."""
        rows = []
        first = self.results[0]
        for index in range(len(first.bucket_perplexity)):
            start = index * first.bucket_size + 1
            end = min(start + first.bucket_size - 1, first.tokens)
            row: dict = {"tokens": f"{start:,}-{end:,}"}
            for result in self.results:
                held = next(
                    (b for p, b in zip(result.memory_positions, result.memory_bytes) if p >= end + 1),
                    result.memory_bytes[-1],
                )
                row[f"{result.cache} ppl"] = result.bucket_perplexity[index]
                row[f"{result.cache} MiB"] = held / 2**20
            rows.append(row)
        return rows

    def table(self) -> str:
        chunk = f", chunks of {self.chunk_size}" if self.mode == "chunk" else ", one token at a time"
        header = f"{self.model} on {self.dataset} ({self.data_source}), {self.max_tokens:,} tokens{chunk}"
        return header + "\n" + format_table(self.table_rows())

    def to_dict(self) -> dict:
        return asdict(self)

    def write_json(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n", encoding="utf-8")

    def write_csv(self, path: Path) -> None:
        """One row per cache with the scalar figures and their ratios."""
        with open(path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
            writer.writeheader()
            for r in self.results:
                row = {column: getattr(r, column) for column in CSV_COLUMNS if hasattr(r, column)}
                row.update({f"{figure}_ratio": r.ratios[figure] for figure in RATIO_FIGURES})
                writer.writerow(row)


class PartialResults:
    """Each result saved as soon as it is measured, under `folder/<settings digest>/`, so an interrupted run
    loses at most the result in progress and `--resume` reuses only results of the same settings (model,
    data, length, mode, seed, ..., and what the command adds: the model's weights fingerprint, the dataset's
    hash). Files are written atomically (a rename). Files are read back as untrusted: regular files of at
    most `max_bytes`, every field checked by the result type's `from_record`."""

    def __init__(self, folder: Path, settings: dict, max_bytes: int = PARTIAL_MAX_BYTES):
        self.digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]
        self.folder = Path(folder) / self.digest
        self.settings = settings
        self.max_bytes = max_bytes

    def _path(self, label: str) -> Path:
        return self.folder / f"{hashlib.sha256(label.encode()).hexdigest()[:16]}.json"

    def save(self, label: str, result: object) -> None:
        """Save `result` (a dataclass) under `label`."""
        self.folder.mkdir(parents=True, exist_ok=True)
        record = {"settings": self.settings, "digest": self.digest, "label": label, "result": asdict(result)}
        record = json.dumps(record, default=str)
        handle, temporary = tempfile.mkstemp(dir=self.folder, suffix=".tmp")
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(record)
        os.replace(temporary, self._path(label))

    def load(self, kind: type[T]) -> dict[str, T]:
        """Results of type `kind` (which has `from_record(result, label, settings)`) saved by earlier runs with
        these settings, by label. A file that is not a regular file, too large, not JSON, of other settings,
        saved under another label's name, or with any field out of range is skipped with one warning naming
        it: its cache is then measured again (never a figure that was not measured)."""
        found = {}
        try:
            paths = sorted(self.folder.glob("*.json")) if self.folder.is_dir() else []
        except OSError as error:
            logger.warning("cannot list partial results in %s (%s); every cache is measured", self.folder, error)
            return found
        for path in paths:
            try:
                label, result = self._read(path, kind)
            except (OSError, ValueError, TypeError, KeyError, AttributeError, RecursionError) as error:
                reason = " ".join(str(error).split()) or type(error).__name__
                reason = reason if len(reason) <= 300 else reason[:300] + "…"  # a planted value can be huge
                logger.warning("skipping partial result %s: %s; its cache is measured again", path, reason)
                continue
            found[label] = result
        return found

    def _read(self, path: Path, kind: type[T]) -> tuple[str, T]:
        data = read_regular_file(path, self.max_bytes, "partial result", follow_links=False)
        record = json.loads(data.decode("utf-8"))
        if not isinstance(record, dict) or set(record) != {"settings", "digest", "label", "result"}:
            raise ValueError("not a partial result record (settings, digest, label, result)")
        if record["digest"] != self.digest or record["settings"] != json.loads(json.dumps(self.settings, default=str)):
            raise ValueError(f"saved with other settings (digest {str(record['digest'])[:16]!r}, not {self.digest!r})")
        label = record["label"]
        if not isinstance(label, str) or self._path(label).name != path.name:
            raise ValueError(f"label={label!r} is not the cache this file is saved for")
        return label, kind.from_record(record["result"], label, self.settings)
