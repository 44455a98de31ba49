"""TriAttention: score keys by the attention that calibrated query centers are expected to pay them over the
coming distances; the query statistics and their file format."""

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from hf_kvcache.files import read_text_file, write_text_file
from hf_kvcache.geometry import LayerGeometry
from hf_kvcache.policies.base import EvictionPolicy, Needs, Step, check_keys_meet_queries, keep_top, register_policy
from hf_kvcache.rope import Rope
from hf_kvcache.validation import check_int

FORMAT = "hf_kvcache.query_statistics"
VERSION = 1
# A file holds (channels + channels / 2) numbers per query head and layer: 32 layers x 32 heads x 128 channels
# take about 4 MB of JSON.
MAX_STATISTICS_BYTES = 64 * 1024 * 1024
MAX_HORIZON = 1 << 20


def component_norms(x: torch.Tensor, rope: Rope | None) -> torch.Tensor:
    """float32 [..., components]: the norm of each channel pair RoPE rotates together (a rotation leaves it
    unchanged), then the absolute value of each channel it leaves alone; without RoPE, of every channel."""
    if rope is None:
        return x.float().abs()
    rotary = x[..., : rope.rotary_dim].float()
    first, second = rotary.chunk(2, dim=-1) if rope.layout == "half" else (rotary[..., 0::2], rotary[..., 1::2])
    return torch.cat([torch.hypot(first, second), x[..., rope.rotary_dim :].float().abs()], dim=-1)


def component_count(geometry: LayerGeometry) -> int:
    """How many components `component_norms` gives for one of this layer's query or key vectors."""
    rope = geometry.rope
    return geometry.key_dim if rope is None else geometry.key_dim - rope.rotary_dim // 2


@dataclass(frozen=True, eq=False)
class QueryStatistics:
    """Calibrated statistics of the queries before RoPE, per full-attention layer and query head.

    Args:
        centers: {layer index: float32 [query heads, channels]}, the mean pre-RoPE query.
        component_norms: {layer index: float32 [query heads, components]}, the mean norm of each rotated channel
            pair and the mean absolute value of each other channel (`component_norms`) of the pre-RoPE queries.
        model, source: the model and the calibration text (informative); tokens: the text's length; chunk:
            tokens per forward; seconds: how long it took.

    Raises:
        ValueError: layers that differ between the two tables, tensors not 2-D, not finite or of inconsistent
            sizes, negative norms, or bad metadata (each named).
    """

    centers: dict[int, torch.Tensor]
    component_norms: dict[int, torch.Tensor]
    model: str = ""
    source: str = ""
    tokens: int = 0
    chunk: int = 0
    seconds: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.centers, dict) or not isinstance(self.component_norms, dict):
            raise ValueError("centers and component_norms must be dicts {layer index: tensor}")
        if sorted(self.centers) != sorted(self.component_norms) or not self.centers:
            raise ValueError(
                f"centers hold layers {sorted(self.centers)[:8]}, component_norms {sorted(self.component_norms)[:8]}: "
                "both must hold the same, at least one"
            )
        for layer, center in self.centers.items():
            norms = self.component_norms[layer]
            if type(layer) is not int or layer < 0:
                raise ValueError(f"layer index {layer!r} must be an integer >= 0")
            for name, tensor in (("centers", center), ("component_norms", norms)):
                if not isinstance(tensor, torch.Tensor) or tensor.dim() != 2 or not tensor.is_floating_point():
                    raise ValueError(f"{name}[{layer}] must be a floating tensor [query heads, ...]")
                if not torch.isfinite(tensor).all():
                    raise ValueError(f"{name}[{layer}] holds values that are not finite")
            channels = center.shape[1]
            if norms.shape[0] != center.shape[0] or not (channels + 1) // 2 <= norms.shape[1] <= channels:
                raise ValueError(
                    f"layer {layer}: centers {tuple(center.shape)} and component_norms {tuple(norms.shape)} do not "
                    "fit together (the same query heads; between channels / 2 and channels components)"
                )
            if (norms < 0).any():
                raise ValueError(f"component_norms[{layer}] holds negative norms")
        for name in ("model", "source"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name}={getattr(self, name)!r} must be text")
        check_int("tokens", self.tokens)
        check_int("chunk", self.chunk)
        if self.seconds is not None and not (isinstance(self.seconds, int | float) and math.isfinite(self.seconds)):
            raise ValueError(f"seconds={self.seconds!r} must be a finite number or None")

    def check_layer(self, geometry: LayerGeometry, policy: str) -> None:
        """Refuse a layer these statistics were not calibrated for (a ValueError naming it and the sizes)."""
        where = f"{geometry.describe()}: {policy}'s query statistics"
        if geometry.index not in self.centers:
            raise ValueError(f"{where} hold no such layer (they hold {sorted(self.centers)[:8]}): another model's?")
        heads, channels = self.centers[geometry.index].shape
        components = self.component_norms[geometry.index].shape[1]
        expected = (geometry.key_dim, component_count(geometry))
        if (channels, components) != expected or heads % geometry.kv_heads:
            raise ValueError(
                f"{where} are {heads} query heads x {channels} channels ({components} components); this layer has "
                f"{geometry.kv_heads} KV heads of {expected[0]} channels ({expected[1]} components): another model's?"
            )

    # --- the file: JSON, one line per layer and table ----------------------------------------------
    def to_json(self) -> str:
        head = {
            "format": FORMAT,
            "version": VERSION,
            "model": self.model,
            "calibration": {"source": self.source, "tokens": self.tokens, "chunk": self.chunk, "seconds": self.seconds},
        }
        rows = [
            json.dumps(
                {
                    "layer": layer,
                    "centers": self.centers[layer].tolist(),
                    "component_norms": self.component_norms[layer].tolist(),
                }
            )
            for layer in sorted(self.centers)
        ]
        text = json.dumps(head, indent=2, ensure_ascii=False)
        return text[: text.rindex("}")].rstrip() + ',\n  "layers": [\n    ' + ",\n    ".join(rows) + "\n  ]\n}\n"

    def save(self, path: str | os.PathLike) -> Path:
        """Write `to_json()` to `path` (parent folders created); returns the path."""
        return write_text_file(path, self.to_json())

    @classmethod
    def from_json(cls, text: str, origin: str = "query statistics") -> "QueryStatistics":
        """Inverse of `to_json`, every field checked (as untrusted input).

        Raises:
            ValueError: not JSON, not query statistics, another version, or a missing or bad field, naming `origin`.
        """
        try:
            data = json.loads(text)
        except (ValueError, RecursionError):
            raise ValueError(f"{origin}: not JSON") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f'{origin}: not query statistics (no "format": "{FORMAT}" field)')
        if type(data.get("version")) is not int or data["version"] != VERSION:
            raise ValueError(
                f"{origin}: query statistics version {data.get('version')!r}; this package reads {VERSION}"
            )
        try:
            calibration, layers = data.get("calibration", {}), data["layers"]
            if not isinstance(calibration, dict) or not isinstance(layers, list):
                raise ValueError("calibration must be an object and layers a list")
            centers, norms = {}, {}
            for row in layers:
                layer = row["layer"] if isinstance(row, dict) else None
                if type(layer) is not int or layer in centers:
                    raise ValueError(f"every layer must be an object with a distinct integer 'layer', got {layer!r}")
                centers[layer], norms[layer] = (_matrix(row[name], f"layer {layer} {name}") for name in TABLES)
            return cls(
                centers,
                norms,
                data.get("model", ""),
                calibration.get("source", ""),
                calibration.get("tokens", 0),
                calibration.get("chunk", 0),
                calibration.get("seconds"),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(
                f"{origin}: {error if isinstance(error, ValueError) else f'missing field {error}'}"
            ) from None

    @classmethod
    def load(cls, path: str | os.PathLike) -> "QueryStatistics":
        """Read statistics written by `save` (a regular file of at most `MAX_STATISTICS_BYTES`, 64 MiB; see
        `from_json`). Raises OSError when it cannot be opened, ValueError otherwise; both name the file."""
        text = read_text_file(path, MAX_STATISTICS_BYTES, "query statistics")
        return cls.from_json(text, origin=f"query statistics {os.fspath(path)}")


TABLES = ("centers", "component_norms")


def _matrix(rows: object, name: str) -> torch.Tensor:
    """A JSON list of equally long lists of numbers as a float32 tensor (a ValueError naming `name` otherwise)."""
    if not isinstance(rows, list) or not rows or not all(isinstance(row, list) and row for row in rows):
        raise ValueError(f"{name} must be a non-empty list of non-empty lists of numbers")
    if len({len(row) for row in rows}) != 1 or not all(
        isinstance(x, int | float) and not isinstance(x, bool) for row in rows for x in row
    ):
        raise ValueError(f"{name} must be a list of equally long lists of numbers")
    return torch.tensor(rows, dtype=torch.float32)


@register_policy("triattention", "TriAttention: keys scored by calibrated pre-RoPE query centers over distance")
@dataclass(frozen=True)
class TriAttention(EvictionPolicy):
    """Keeps the `recent` newest tokens and the held keys that the queries of the coming positions are expected
    to attend most, predicted from each query head's pre-RoPE statistics and each key's distance; in prefill
    and decoding, with no attention capture at decode time (the statistics come from a file) and a score linear
    in the held keys.

    Before RoPE, a head's queries cluster around a fixed center `c` (the paper's Q/K concentration). Between
    a query at position P and a key at position J, RoPE makes the logit `q . R((J - P) theta) k`: for the center,
    a trigonometric series in the distance `P - J`, over the rotated channel pairs f,
    `sum_f |c_f| |k_f| cos((P - J) theta_f + phi_f)`. Each held key's score, per query head, is

        mean over future distances of the center's logit  +  sum_f (E|q_f| - |c_f|) |k_f|

    the future query positions being `seen - 1 + d` for d = 1, 2, 4, ... up to `horizon` (geometric, so that
    near and far distances count alike), and the second term the part of the queries' magnitude the center does
    not carry (phase-free), times the key's norm in that pair. Channels RoPE leaves alone count as their own
    components. Scores are averaged over the query heads of each KV head. The logit scale is left out (it does
    not change the order). This is our reading of the method (mean over geometric distances, that norm term);
    the paper's exact weighting may differ.

    The statistics come from `hf-kvcache calibrate --query-statistics` (a `QueryStatistics` file, checked
    against every layer's sizes at cache construction; another model of the same sizes cannot be told apart, so
    keep a file beside its model). With `statistics=None` they are estimated online from the
    queries this cache has seen (their running means per row; padding queries excluded); calibration runs the
    online form over a text.

    Rows of a left-padded batch: a row's RoPE positions start at its first real token (as `generate` assigns
    them), recorded at its first forward (`step.running["rope_offset"]`).

    Source: Mao et al. 2026, "TriAttention: Efficient Long Reasoning with Trigonometric KV Compression",
    https://arxiv.org/abs/2604.04921.

    Args:
        budget: tokens kept per layer and KV head.
        per_head: each KV head keeps its own tokens (True) or all keep the same tokens (False).
        statistics: path of a query-statistics file, or None (estimated online).
        horizon: the farthest future distance averaged (at most `MAX_HORIZON`).
        recent: newest tokens always kept (at most the budget).

    Raises:
        ValueError: a parameter out of range, a statistics file that cannot be read or is not valid (named); at
            cache construction, a layer the statistics do not cover or do not fit, a latent MLA layer, a RoPE layer
            whose frequencies are unknown (named).
    """

    statistics: str | None = None
    horizon: int = 1024
    recent: int = 8
    needs = Needs.QUERY_STATES

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("horizon", self.horizon, 1, MAX_HORIZON, hint="the farthest future distance averaged")
        self.check_within_budget(recent=self.recent)
        loaded = None
        if self.statistics is not None:
            if not isinstance(self.statistics, str | os.PathLike):
                raise ValueError(f"statistics={self.statistics!r} must be a file path or None (estimated online)")
            try:
                loaded = QueryStatistics.load(self.statistics)
            except OSError as error:
                raise ValueError(f"statistics={self.statistics!r}: {error}") from None
        object.__setattr__(self, "_loaded", loaded)  # not a field: specs and equality see the path

    def check_layer(self, geometry: LayerGeometry) -> None:
        check_keys_meet_queries(self, geometry)
        if geometry.positions == "rope" and geometry.rope is None:
            raise ValueError(
                f"{geometry.describe()}: TriAttention predicts attention from RoPE distances, but this layer's "
                f"rotation is not known ({geometry.rope_problem}); use a policy that reads attention (h2o, tova)"
            )
        if self._loaded is not None:
            self._loaded.check_layer(geometry, type(self).__name__)

    def scored_queries(self, query_length: int) -> int:
        return query_length if self._loaded is None else 0

    def future_distances(self) -> torch.Tensor:
        """float64 [n]: 1, 2, 4, ... up to `horizon`."""
        return 2.0 ** torch.arange(int(math.log2(self.horizon)) + 1, dtype=torch.float64)

    def update_state(self, step: Step) -> None:
        """Record each row's RoPE offset at its first forward; online, add this forward's real queries (before
        RoPE) to the running sums."""
        running = step.running
        if "rope_offset" not in running:  # the first real token is at RoPE position 0
            running["rope_offset"] = step.real[:, 0].int().argmax(dim=-1)
        if step.queries is None:
            return
        count = step.queries.shape[2]
        queries = self._unrotated(step.queries.float(), step, torch.arange(step.seen - count, step.seen))
        weights = step.real[:, 0, -count:].float()  # [batch, count]: padding queries count zero
        sums = {
            "query_sum": (queries * weights[:, None, :, None]).sum(2),
            "norm_sum": (component_norms(queries, step.geometry.rope) * weights[:, None, :, None]).sum(2),
            "query_count": weights.sum(1),
        }
        for name, value in sums.items():
            running[name] = running[name] + value if name in running else value

    def _unrotated(self, x: torch.Tensor, step: Step, seen_at: torch.Tensor) -> torch.Tensor:
        """`x` [batch, heads, n, channels] rotated back from the RoPE positions of the stored indices `seen_at` [n]."""
        rope = step.geometry.rope
        if rope is None:
            return x
        angles = self._angles(step, seen_at.to(x.device, torch.float64)[None])  # [batch, n, rotary / 2]
        return rope.rotate(x, angles.cos()[:, None], -angles.sin()[:, None])

    def _angles(self, step: Step, seen_at: torch.Tensor) -> torch.Tensor:
        """RoPE angles [batch, n, rotary / 2] of stored indices `seen_at` [1 or batch, n] in each row."""
        rope = step.geometry.rope
        positions = seen_at - step.running["rope_offset"].to(torch.float64)[:, None]
        return positions[..., None] * rope.inv_freq.to(seen_at.device)

    def statistics_of(self, step: Step) -> tuple[torch.Tensor, torch.Tensor]:
        """The centers [batch or 1, q_heads, channels] and mean component norms [batch or 1, q_heads, components]
        this step is scored with: the file's for the layer, or the running means."""
        if self._loaded is not None:
            index = step.geometry.index
            device = step.real.device
            return self._loaded.centers[index][None].to(device), self._loaded.component_norms[index][None].to(device)
        count = step.running["query_count"].clamp(min=1)[:, None, None]
        return step.running["query_sum"] / count, step.running["norm_sum"] / count

    def score(self, step: Step) -> torch.Tensor:
        """float32 [batch, kv_heads, stored]: the expected logit of the coming queries for every held key."""
        centers, norms = self.statistics_of(step)
        keys = step.keys.float()
        batch, kv_heads = keys.shape[:2]
        rope = step.geometry.rope
        spread = norms - component_norms(centers, rope)  # the magnitude the center does not carry
        if rope is not None:  # the mean of the center's rotations to the future positions
            future = (step.seen - 1 + self.future_distances().to(keys.device))[None]
            angles = self._angles(step, future)  # [batch, n, rotary / 2]
            centers = rope.rotate(
                centers.expand(batch, -1, -1), angles.cos().mean(1)[:, None], angles.sin().mean(1)[:, None]
            )
        centers = centers.expand(batch, -1, -1).unflatten(1, (kv_heads, -1))  # [batch, kv_heads, group, channels]
        spread = spread.expand(batch, -1, -1).unflatten(1, (kv_heads, -1))
        trigonometric = centers @ keys.transpose(-1, -2)  # [batch, kv_heads, group, stored]
        magnitude = spread @ component_norms(keys, rope).transpose(-1, -2)
        return (trigonometric + magnitude).mean(dim=2)

    def select(self, step: Step, budget: int) -> torch.Tensor:
        return keep_top(step, self.score(step), budget, self.per_head, recent=self.recent)
