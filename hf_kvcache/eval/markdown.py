"""`report.md`: a run's settings, results table, Pareto-optimal caches and figures as GitHub Markdown, to
paste into an issue or a paper.

`write_report(results, folder, figures)` writes it for a perplexity run; `write_markdown_report(...)` takes
any rows and settings (task accuracy tables too) and is what it calls.
"""

import os
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path

from hf_kvcache.eval.plots import ParetoPoint, pareto_front, pareto_points
from hf_kvcache.eval.results import EvalResults
from hf_kvcache.report import _cell

# Alt text of the figures the eval tool writes; other figures get their file name.
FIGURE_TEXT = {
    "pareto.png": "quality against the bytes each cache holds, Pareto-optimal caches starred",
    "log_perplexity.png": "log perplexity against position",
    "cache_memory.png": "cache memory against position",
}


def _escape(text: str) -> str:
    """A table cell's text: a pipe would end the cell, a line break the row."""
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: Sequence[Mapping[str, object]]) -> str:
    """Rows of dicts as a GitHub Markdown table: the columns of all rows in order of appearance, numbers
    formatted as `format_table` does and right-aligned, the first column (the row's name) as code."""
    if not rows:
        return "(no results)"
    columns = list(dict.fromkeys(column for row in rows for column in row))

    def numeric(value: object) -> bool:
        return (isinstance(value, int | float) and not isinstance(value, bool)) or value == "-"

    right = [all(numeric(row.get(column, "-")) for row in rows) for column in columns]
    lines = [
        "| " + " | ".join(_escape(column) for column in columns) + " |",
        "|" + "|".join("---:" if r else ":---" for r in right) + "|",
    ]
    for row in rows:
        cells = [_escape(_cell(row.get(column, ""))) for column in columns]
        if isinstance(row.get(columns[0]), str) and cells[0]:
            cells[0] = f"`{cells[0]}`"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _figure_link(figure: Path, folder: Path) -> str:
    """An image embedded by its path relative to the report, so the folder can be moved or pasted whole."""
    relative = Path(os.path.relpath(figure, folder)).as_posix()
    target = f"<{relative}>" if " " in relative else relative
    return f"![{FIGURE_TEXT.get(Path(figure).name, Path(figure).stem.replace('_', ' '))}]({target})"


def _pareto_section(points: Sequence[ParetoPoint], lower_is_better: bool, quality_label: str) -> list[str]:
    optimal = pareto_front(points, lower_is_better)
    direction = "lower" if lower_is_better else "higher"
    lines = [
        "## Pareto-optimal caches",
        "",
        f"Caches no other cache beats: none holds fewer or equal bytes with an equal or better {quality_label} "
        f"({direction} is better), at least one of the two strictly. Fewest bytes first:",
        "",
    ]
    best = sorted((p for p, is_best in zip(points, optimal) if is_best), key=lambda p: (p.cache_bytes, p.name))
    if not best:  # every figure diverged
        return [*lines, f"(none: no cache has a finite {quality_label})", ""]
    return [
        *lines,
        *(f"- `{p.name}`: {_cell(p.cache_bytes / 2**20)} MiB, {quality_label} {_cell(p.quality)}" for p in best),
        "",
    ]


def write_markdown_report(
    folder: Path,
    title: str,
    settings: Mapping[str, object],
    rows: Sequence[Mapping[str, object]],
    *,
    notes: Sequence[str] = (),
    points: Sequence[ParetoPoint] = (),
    lower_is_better: bool = True,
    quality_label: str = "perplexity",
    figures: Sequence[Path] = (),
    command: str | Sequence[str] | None = None,
    filename: str = "report.md",
) -> Path:
    """Write `folder/filename` (created with its folder if needed) and return its path.

    Sections: `# title`; the settings as a list (`{"model": ..., "seed": 0}`); the command line that
    produced the run in a shell block when given (an argv list is quoted for the shell); `rows` as a
    Markdown table (`markdown_table`) followed by `notes`, one paragraph each; the Pareto-optimal caches of
    `points` (bytes held and `quality_label`, better being lower or higher per `lower_is_better`) when
    points are given; and `figures` embedded by paths relative to `folder`. For a task accuracy table:
    `write_markdown_report(folder, title, settings, rows, points=pareto_points(tasks, "accuracy",
    "mean_cache_bytes", name="spec"), lower_is_better=False, quality_label="accuracy", figures=[...])`.
    Raises OSError when the file cannot be written.
    """
    lines = [f"# {title}", "", "## Settings", ""]
    lines += [f"- **{name}**: {value}" for name, value in settings.items()]
    if command is not None:
        shell = command if isinstance(command, str) else shlex.join(command)
        lines += ["", "Produced by:", "", "```sh", shell, "```"]
    lines += ["", "## Results", "", markdown_table(rows), ""]
    for note in notes:
        lines += [note, ""]
    if points:
        lines += _pareto_section(points, lower_is_better, quality_label)
    if figures:
        lines += ["## Figures", ""]
        for figure in figures:
            lines += [_figure_link(Path(figure), Path(folder)), ""]
    path = Path(folder) / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines).rstrip("\n") + "\n", encoding="utf-8")
    return path


def run_settings(results: EvalResults) -> dict[str, str]:
    """A perplexity run's settings, as `write_markdown_report` lists them."""
    mode = f"chunks of {results.chunk_size} tokens" if results.mode == "chunk" else "one token at a time"
    return {
        "model": results.model,
        "dataset": f"{results.dataset} ({results.data_source})",
        "tokens": f"{results.max_tokens:,} ({results.results[0].tokens:,} predicted), then {results.decode_tokens} greedy "
        "decode steps timed",
        "mode": f"{results.mode}: {mode}",
        "device": results.device,
        "dtype": results.dtype,
        "seed": str(results.seed),
        "versions": ", ".join(f"{name} {version}" for name, version in results.versions.items()),
    }


def write_report(
    results: EvalResults,
    folder: Path,
    figures: Sequence[Path],
    command: str | Sequence[str] | None = None,
    segments: bool = False,
) -> Path:
    """Write `folder/report.md` for a perplexity run: its settings, the table of
    `EvalResults.table_rows()`, the Pareto-optimal caches (perplexity against the bytes each cache holds at
    the end), and `figures` (e.g. `write_plots`' paths) embedded by relative links. `command` is the
    command line (a string or an argv list) that produced the run; `segments` adds the per-segment
    perplexity and bytes held (`EvalResults.segment_rows`). Returns the path; raises OSError when it cannot
    be written."""
    kinds = sorted({r.peak_memory_kind for r in results.results})
    note = (
        f"Columns ending in `x` are ratios to the first cache, `{results.results[0].cache}`. `cache MiB`: bytes "
        f"the cache holds after the whole text; `peak MiB`: peak memory of the process ({', '.join(kinds)}); "
        "speeds in tokens per second."
    )
    return write_markdown_report(
        folder,
        f"KV-cache evaluation: {Path(results.model).name} on {results.dataset}",
        run_settings(results),
        results.table_rows(),
        notes=[
            note,
            *(
                [f"Per segment (perplexity, and MiB held at its end):\n\n{markdown_table(results.segment_rows())}"]
                if segments
                else []
            ),
        ],
        points=pareto_points(results),
        figures=figures,
        command=command,
    )
