"""PNG figures of a run: log-perplexity and cache memory against position (every cache on one figure), and
quality against cache bytes with the Pareto-optimal caches marked."""

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from itertools import combinations, pairwise
from pathlib import Path
from typing import Any, NamedTuple

from hf_kvcache.eval.results import CacheResult, EvalResults

DPI = 120
MARKER_SIZE = 8  # points, dominated caches
STAR_SIZE = 13  # points, Pareto-optimal caches
LABEL_GAP = 6  # pixels between a point's marker and its label
LABEL_SIZE = 9  # points
LEADER_GAP = 24  # pixels between a marker and a label moved off its height


class ParetoPoint(NamedTuple):
    """One cache on the quality-versus-memory picture: its name, the bytes it holds, its quality figure."""

    name: str
    cache_bytes: float
    quality: float


def pareto_points(
    results: EvalResults | Iterable[Any],
    quality: str = "perplexity",
    cache_bytes: str = "cache_bytes",
    name: str = "cache",
) -> list[ParetoPoint]:
    """One point per cache, in the run's order.

    `results` is an `EvalResults` (its `CacheResult`s are used) or any records, objects or mappings, that
    carry the `name`, `quality` and `cache_bytes` (bytes) fields; e.g. task results (`TaskResult`, whose
    `cache` is the bare strategy name and `spec` the full label) with
    `pareto_points(tasks, quality="accuracy", cache_bytes="mean_cache_bytes", name="spec")`.
    Raises ValueError naming the record and field when a record lacks one of them.
    """
    records = results.results if isinstance(results, EvalResults) else results
    return [
        ParetoPoint(str(_field(r, i, name)), float(_field(r, i, cache_bytes)), float(_field(r, i, quality)))
        for i, r in enumerate(records)
    ]


def _field(record: Any, index: int, name: str) -> Any:
    get = record.get if isinstance(record, Mapping) else lambda key: getattr(record, key, None)
    if (value := get(name)) is None:
        raise ValueError(f"result {index} ({get('spec') or get('cache') or 'unnamed'}) has no {name!r}")
    return value


def pareto_front(points: Sequence[ParetoPoint], lower_is_better: bool) -> list[bool]:
    """For each point, whether it is Pareto-optimal: no other point has fewer or equal bytes and better or
    equal quality with at least one of the two strictly better. Equal points are all optimal; a point whose
    bytes or quality is not finite (a diverged perplexity) is never optimal and dominates nothing."""
    usable = [math.isfinite(p.cache_bytes) and math.isfinite(p.quality) for p in points]

    def dominates(a: ParetoPoint, b: ParetoPoint) -> bool:
        no_worse = a.cache_bytes <= b.cache_bytes and (
            a.quality <= b.quality if lower_is_better else a.quality >= b.quality
        )
        return no_worse and (a.cache_bytes < b.cache_bytes or a.quality != b.quality)

    return [
        usable[i] and not any(usable[j] and dominates(other, point) for j, other in enumerate(points) if j != i)
        for i, point in enumerate(points)
    ]


def _clusters(centres: Sequence[Any], near_x: float, near_y: float) -> list[list[int]]:
    """Groups of point indices whose markers nearly coincide (pixel distances within `near_x` and `near_y`,
    chained), each sorted bottom to top; the groups are ordered by their lowest point."""
    group = list(range(len(centres)))
    for i, j in combinations(range(len(centres)), 2):
        (xi, yi), (xj, yj) = centres[i], centres[j]
        if abs(xi - xj) <= near_x and abs(yi - yj) <= near_y:
            old, new = group[j], group[i]
            group = [new if g == old else g for g in group]
    members = [[i for i in range(len(centres)) if group[i] == g] for g in dict.fromkeys(group)]
    ordered = [sorted(m, key=lambda i: (centres[i][1], centres[i][0])) for m in members]
    return sorted(ordered, key=lambda m: centres[m[0]][1])


def _place_labels(axis: Any, points: Sequence[ParetoPoint], line: Sequence[tuple[float, float]]) -> list[Any]:
    """Label each point with its cache name beside its marker, kept off every other label, marker, leader
    line and segment of the polyline `line` (data coordinates), and inside the axes where it fits.

    Points whose markers nearly coincide (ties) get their labels stacked in the order of their heights, each
    joined to its point by a leader line; a lone point's label goes right or left of it, moved up or down
    as little as needed, with a leader line once it has left its point's height. Returns the labels."""
    from matplotlib.path import Path as Segment
    from matplotlib.transforms import Bbox

    figure = axis.figure
    renderer = figure.canvas.get_renderer()
    frame = axis.get_window_extent(renderer)
    to_points = 72 / figure.dpi  # annotate offsets are in points, the layout below is in pixels
    radius = max(MARKER_SIZE, STAR_SIZE) / 2 / to_points + 1
    centres = [axis.transData.transform((p.cache_bytes, p.quality)) for p in points]
    markers = [Bbox.from_bounds(x - radius, y - radius, 2 * radius, 2 * radius) for x, y in centres]
    corners = axis.transData.transform(line) if line else []
    segments = [Segment([start, end]) for start, end in pairwise(corners)]
    sizes = []
    for point in points:
        probe = axis.text(0, 0, point.name, fontsize=LABEL_SIZE)
        sizes.append(probe.get_window_extent(renderer).size)
        probe.remove()
    pitch = max(height for _, height in sizes) + 4
    boxes: list[Any] = []  # labels placed so far

    def layout(group: list[int], shift: float, right: bool) -> list[tuple[int, Any, Any]]:
        """(point, label box, leader or None) for each of the group's labels."""
        stacked = len(group) > 1
        middle = sum(centres[i][1] for i in group) / len(group)
        edge_x = max(centres[i][0] for i in group) if right else min(centres[i][0] for i in group)
        gap = radius + (LEADER_GAP if stacked or abs(shift) > pitch else LABEL_GAP)
        edge = edge_x + gap if right else edge_x - gap
        placed = []
        for rank, i in enumerate(group):
            (x, y), (width, height) = centres[i], sizes[i]
            label_y = middle + (rank - (len(group) - 1) / 2) * pitch + shift
            box = Bbox.from_bounds(edge if right else edge - width, label_y - height / 2, width, height).padded(2)
            # The leader as drawn: from the label's near side to its marker's edge.
            near = x + radius if right else x - radius
            leader = Segment([(edge, label_y), (near, y)]) if gap > radius + LABEL_GAP else None
            placed.append((i, box, leader))
        return placed

    def inside(placed: list[tuple[int, Any, Any]]) -> bool:
        return all(frame.contains(box.x0, box.y0) and frame.contains(box.x1, box.y1) for _, box, _ in placed)

    def free(placed: list[tuple[int, Any, Any]], group: list[int]) -> bool:
        others = [m for k, m in enumerate(markers) if k not in group]
        leaders = [leader for _, _, leader in placed if leader is not None]
        return not any(
            any(box.overlaps(other) for other in boxes + others)
            or any(segment.intersects_bbox(box, filled=False) for segment in segments)
            or any(leader.intersects_bbox(other, filled=False) for leader in leaders for other in boxes)
            for _, box, _ in placed
        )

    labels = []
    for group in _clusters(centres, 2 * radius, pitch):
        shifts = [0.0, *(sign * step * pitch / 3 for step in range(1, 60) for sign in (1, -1))]
        candidates = [layout(group, shift, right) for shift in shifts for right in (True, False)]
        within = [c for c in candidates if inside(c)]
        # The nearest free spot; failing that, the nearest inside the axes; failing that, right of the points.
        chosen = next((c for c in within if free(c, group)), within[0] if within else candidates[0])
        for i, box, leader in chosen:
            (x, y), point = centres[i], points[i]
            boxes.append(box)
            right = box.x0 > x
            # Offsets of the text's near side, inside the box's 2-pixel padding.
            offset = (box.x0 + 2 if right else box.x1 - 2) - x, (box.y0 + box.y1) / 2 - y
            arrow = None
            if leader is not None:
                segments.append(leader)
                arrow = {"arrowstyle": "-", "color": "0.55", "lw": 0.7, "shrinkA": 1, "shrinkB": radius * to_points}
                arrow["relpos"] = (0.0 if right else 1.0, 0.5)  # from the text's near side, not through it
            labels.append(
                axis.annotate(
                    point.name,
                    (point.cache_bytes, point.quality),
                    xytext=(offset[0] * to_points, offset[1] * to_points),
                    textcoords="offset points",
                    ha="left" if right else "right",
                    va="center",
                    fontsize=LABEL_SIZE,
                    arrowprops=arrow,
                )
            )
    return labels


def draw_pareto(
    points: Sequence[ParetoPoint],
    quality_label: str,
    lower_is_better: bool,
    title: str,
    bytes_label: str = "bytes the cache holds at the end",
) -> tuple[Any, list[Any]]:
    """The figure of `write_pareto` and its point labels (for tests of their layout); the caller closes it.
    Raises ValueError when no point has finite bytes and quality."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    optimal = pareto_front(points, lower_is_better)
    finite = [math.isfinite(p.cache_bytes) and math.isfinite(p.quality) for p in points]
    drawn = [p for p, ok in zip(points, finite) if ok]
    if not drawn:
        raise ValueError("no cache with finite bytes and quality to draw")
    mib = [p.cache_bytes / 2**20 for p in drawn]
    # A log axis only where the sizes span more than 10x; it cannot show 0 bytes.
    log_x = min(mib) > 0 and max(mib) / min(mib) > 10
    scaled = [ParetoPoint(p.name, p.cache_bytes / 2**20, p.quality) for p in drawn]
    front = sorted((p.cache_bytes / 2**20, p.quality) for p, best in zip(points, optimal) if best)
    others = [(p.cache_bytes / 2**20, p.quality) for p, best, ok in zip(points, optimal, finite) if ok and not best]

    figure, axis = plt.subplots(figsize=(10, 6), dpi=DPI)
    if log_x:
        axis.set_xscale("log")
        # Ticks at 1, 2 and 5 per decade name the few sizes of a run; over 3 decades they would crowd.
        axis.xaxis.set_major_locator(
            LogLocator(base=10, subs=(1.0, 2.0, 5.0) if max(mib) / min(mib) < 1000 else (1.0,))
        )
        axis.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        axis.xaxis.set_minor_formatter(NullFormatter())
    # The step line: the best quality reachable within each byte budget, flat until the next optimal cache.
    steps = [corner for (x, q), (next_x, _) in pairwise(front) for corner in ((x, q), (next_x, q))] + front[-1:]
    axis.plot(*zip(*steps), color="tab:red", lw=1.2, alpha=0.7, label="Pareto front", zorder=2)
    axis.plot(*zip(*front), "*", ms=STAR_SIZE, color="tab:red", mec="darkred", label="Pareto-optimal cache", zorder=4)
    if others:
        axis.plot(*zip(*others), "o", ms=MARKER_SIZE, color="0.6", mec="0.3", label="dominated cache", zorder=3)
    axis.margins(x=0.12, y=0.15)
    if not log_x:
        axis.set_xlim(left=0)  # a linear byte axis from 0, so distances read as ratios and never go negative
    direction = "lower" if lower_is_better else "higher"
    axis.set_xlabel(f"{bytes_label} (MiB{', log scale' if log_x else ''})")
    axis.set_ylabel(f"{quality_label} ({direction} is better)")
    axis.set_title(title)
    axis.grid(alpha=0.3, which="both" if log_x else "major")
    axis.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncols=3, frameon=False)
    hidden = [p.name for p, ok in zip(points, finite) if not ok]
    if hidden:
        figure.text(0.01, 0.01, "not drawn (bytes or quality not finite): " + ", ".join(hidden), fontsize=8)
    figure.tight_layout()
    axis.set(xlim=axis.get_xlim(), ylim=axis.get_ylim())  # fixed before labels are laid out in pixels
    return figure, _place_labels(axis, scaled, steps)


def write_pareto(
    points: Sequence[ParetoPoint],
    path: Path,
    quality_label: str,
    lower_is_better: bool,
    title: str,
    bytes_label: str = "bytes the cache holds at the end",
) -> Path:
    """Write the quality-versus-memory PNG: one labelled point per cache, x = `cache_bytes` in MiB (log scale
    when the sizes span more than 10x), y = `quality`, the Pareto-optimal caches starred and joined by a step
    line. `quality_label` names the y figure and its unit ("perplexity", "accuracy (%)"); " (lower is better)"
    or " (higher is better)" is appended. Returns `path`. Raises ValueError when no point is finite."""
    import matplotlib.pyplot as plt

    figure, _ = draw_pareto(points, quality_label, lower_is_better, title, bytes_label)
    figure.savefig(path, dpi=DPI)
    plt.close(figure)
    return Path(path)


def run_title(results: EvalResults) -> str:
    """A figure title naming the run's model, dataset, tokens and mode."""
    mode = f"chunks of {results.chunk_size}" if results.mode == "chunk" else "token by token"
    return f"{Path(results.model).name}, {results.dataset}, {results.max_tokens:,} tokens, {mode}"


def _log_perplexity_curve(result: CacheResult) -> tuple[list[float], list[float], str]:
    """Bucket middles, mean NLL per bucket, and the legend label."""
    starts = [1 + b * result.bucket_size for b in range(len(result.bucket_perplexity))]
    middles = [start + min(result.bucket_size, result.tokens - start + 1) / 2 for start in starts]
    mean_nll = [math.log(p) for p in result.bucket_perplexity]
    return middles, mean_nll, f"{result.cache} (ppl {result.perplexity:.2f})"


def _memory_curve(result: CacheResult) -> tuple[list[int], list[float], str]:
    return result.memory_positions, [b / 2**20 for b in result.memory_bytes], result.cache


def _draw(
    results: EvalResults,
    curve: Callable[[CacheResult], tuple[list, list, str]],
    ylabel: str,
    path: Path,
    marker: str | None = None,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mode = f"chunks of {results.chunk_size}" if results.mode == "chunk" else "token by token"
    figure, axis = plt.subplots(figsize=(10, 4.5))
    for result in results.results:
        x, y, label = curve(result)
        axis.plot(x, y, marker=marker, markersize=3, label=label)
    axis.set(xlabel="position (tokens)", ylabel=ylabel)
    axis.set_title(f"{Path(results.model).name}, {results.dataset}, {mode}")
    axis.grid(alpha=0.3)
    axis.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))  # beside the curves, not on them
    figure.tight_layout()
    figure.savefig(path, dpi=DPI)
    plt.close(figure)


def write_plots(results: EvalResults, folder: Path) -> list[Path]:
    """Write `log_perplexity.png`, `cache_memory.png` and `pareto.png` (perplexity against the bytes each
    cache holds at the end; left out when no perplexity is finite) into `folder`; return their paths in that
    order."""
    folder = Path(folder)
    bucket = results.results[0].bucket_size
    log_ppl, memory = folder / "log_perplexity.png", folder / "cache_memory.png"
    _draw(results, _log_perplexity_curve, f"log perplexity (mean NLL per {bucket} tokens)", log_ppl, marker="o")
    _draw(results, _memory_curve, "cache memory (MiB)", memory)
    points = pareto_points(results)
    if not any(pareto_front(points, lower_is_better=True)):  # every perplexity diverged: nothing to place
        return [log_ppl, memory]
    return [log_ppl, memory, write_pareto(points, folder / "pareto.png", "perplexity", True, run_title(results))]
