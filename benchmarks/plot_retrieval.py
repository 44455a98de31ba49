"""Budget sweep of `benchmarks/retrieval.py` results: several runs' JSON files (e.g. one per budget or per set of
policies, all on the same prompts) merged into one markdown table (accuracy and MiB held per budget, one row per
spec template) and a PNG of accuracy against budget, one line per template.

Runs are merged only when their task settings (task, samples, prompt tokens, new tokens, seed, text, model) are equal: the same
seeded prompts. A template measured at the same budget in two runs keeps the first file's row.

    python benchmarks/plot_retrieval.py benchmarks/results/retrieval.json benchmarks/results/retrieval-512.json \\
        --output benchmarks/results/retrieval-sweep.png
"""

import argparse
import json
from pathlib import Path

MIB = 2**20
SAME_PROMPTS = ("task", "samples", "prompt_tokens", "new_tokens", "seed", "text", "model")


def merged_rows(paths: list[Path]) -> tuple[dict, dict[str, dict[int, dict]]]:
    """(the shared settings, {template: {budget: row}}) over the runs in `paths`, in first-seen order.

    Raises:
        ValueError: runs on other prompts (settings that differ) or a file without retrieval rows.
    """
    settings, table = None, {}
    for path in paths:
        run = json.loads(Path(path).read_text())
        task = run.get("settings", {}).get("task", "passkey")
        if task not in run:
            raise ValueError(f"{path}: no {task!r} rows (not a benchmarks/retrieval.py result)")
        shared = {name: run["settings"].get(name) for name in SAME_PROMPTS}
        if settings is not None and shared != settings:
            raise ValueError(f"{path}: settings {shared} differ from {settings}: other prompts, not comparable")
        settings = shared
        for row in run[task]:
            budget = row.get("budget")
            table.setdefault(row["template"], {}).setdefault(budget, row)
    return settings or {}, table


def short_label(template: str) -> str:
    """A template as a spec with B for the budget and a file path shortened to its name."""
    parts = [
        part.split("=")[0] + "=" + Path(part.split("=", 1)[1]).name if "/" in part else part
        for part in template.split(",")
    ]
    return ",".join(parts).replace("{budget}", "B").replace("{window}", "B-4")


def markdown(table: dict[str, dict[int, dict]], budgets: list[int]) -> str:
    header = " | ".join(f"B={b}" for b in budgets)
    lines = [f"| spec (B = budget) | {header} | MiB held {' / '.join(map(str, budgets))} |"]
    lines.append("| --- |" + " --- |" * (len(budgets) + 1))
    for template, rows in table.items():
        spec = short_label(template)
        full = None in rows

        def cell(budget, key, rows=rows, full=full):
            row = rows.get(None if full else budget)
            if row is None:
                return "—"
            return f"{row['accuracy']:.0%}" if key == "accuracy" else f"{row['mean_cache_bytes'] / MIB:.2f}"

        accuracy = " | ".join(cell(b, "accuracy") for b in budgets)
        held = " / ".join(cell(b, "bytes") for b in budgets)
        lines.append(f"| `{spec}` | {accuracy} | {held} |")
    return "\n".join(lines)


def plot(table: dict[str, dict[int, dict]], budgets: list[int], settings: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    figure, axes = plt.subplots(figsize=(12, 6))
    colors, markers = plt.get_cmap("tab20").colors, "os^vDP*Xh<>"
    for index, (template, rows) in enumerate(table.items()):
        label = short_label(template)
        if None in rows:  # the full cache: a level, not a function of the budget
            axes.axhline(rows[None]["accuracy"], color="black", linestyle="--", label=label)
            continue
        measured = sorted(b for b in rows if b in budgets)
        style = {"color": colors[index % len(colors)], "marker": markers[index % len(markers)]}
        axes.plot(measured, [rows[b]["accuracy"] for b in measured], label=label, **style)
    axes.set(
        xscale="log",
        xticks=budgets,
        xticklabels=[str(b) for b in budgets],
        xlabel="budget (tokens per layer and KV head)",
        ylabel="accuracy",
        title=f"{settings.get('task')}: {settings.get('samples')} prompts of ~{settings.get('prompt_tokens')} tokens",
    )
    axes.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axes.legend(fontsize=8, loc="center left", bbox_to_anchor=(1, 0.5))
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", type=Path, help="benchmarks/retrieval.py --output files")
    parser.add_argument("--output", type=Path, default=Path("retrieval-sweep.png"), help="the PNG to write")
    args = parser.parse_args(argv)
    settings, table = merged_rows(args.results)
    budgets = sorted({b for rows in table.values() for b in rows if b is not None})
    print(markdown(table, budgets))
    plot(table, budgets, settings, args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
