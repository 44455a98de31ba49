"""Budget sweep of `hf-kvcache eval --task long-generation` runs: one run per budget (its `results.json`), merged
into one markdown table (agreement, KL, first departure, peak MiB and speed per budget, a row per cache with its
budget written B) and a PNG of agreement and KL against budget, a line per cache.

Runs are merged only when they replayed the same generation (the same model, prompt and sampled tokens). A cache's
budget is read from `BUDGET=PATH`: in its spec, `budget=BUDGET` becomes `budget=B` and `window=BUDGET-4` (a sink
cache of the same size) `window=B-4`.

    python benchmarks/plot_long_generation.py 128=benchmarks/results/long-generation-sampled/results.json \\
        256=benchmarks/results/long-generation-sampled-256/results.json --output long-generation-sweep.png
"""

import argparse
import json
from pathlib import Path

MIB = 2**20
SAME_GENERATION = ("model", "prompt_tokens", "temperature", "seed", "generated")


def template(spec: str, budget: int) -> str:
    """`spec` with its budget written B (and a sink cache's window of B - 4 written B-4)."""
    parts = []
    for part in spec.split(","):
        name, _, value = part.partition("=")
        if name.endswith("budget") and value == str(budget):
            part = f"{name}=B"
        elif name.endswith("window") and value == str(budget - 4):
            part = f"{name}=B-4"
        elif "/" in value:
            part = f"{name}={Path(value).name}"
        parts.append(part)
    return ",".join(parts)


def merged_rows(runs: list[tuple[int, Path]]) -> dict[str, dict[int | None, dict]]:
    """{template: {budget (None for the full cache): row}} over `runs`, in first-seen order.

    Raises:
        ValueError: runs of other generations.
    """
    reference, table = None, {}
    for budget, path in runs:
        run = json.loads(Path(path).read_text())
        shared = {name: run.get(name) for name in SAME_GENERATION}
        if reference is not None and shared != reference:
            differing = [name for name in SAME_GENERATION if shared[name] != reference[name]]
            raise ValueError(f"{path}: another generation ({', '.join(differing)} differ): not comparable")
        reference = shared
        full_speed = next(row["decode_tokens_per_s"] for row in run["results"] if row["cache"] == "dynamic")
        for row in run["results"]:
            row = {**row, "speed": row["decode_tokens_per_s"] / full_speed}
            key = None if row["cache"] == "dynamic" else budget
            table.setdefault(template(row["cache"], budget), {}).setdefault(key, row)
    return table


def markdown(table: dict[str, dict[int | None, dict]], budgets: list[int]) -> str:
    lines = ["| cache (B = budget) | budget | top-1 agreement | mean KL (nats) | first departure | peak MiB | speed |"]
    lines.append("| --- | --- | --- | --- | --- | --- | --- |")
    for name, rows in table.items():
        for budget in [None] if None in rows else budgets:
            row = rows.get(budget)
            if row is None:
                continue
            departure = row["first_departure"] if row["first_departure"] is not None else "none"
            lines.append(
                f"| `{name}` | {budget or 'all'} | {row['agreement']:.3f} | {row['mean_kl']:.3f} | {departure} | "
                f"{row['peak_bytes'] / MIB:.2f} | {row['speed']:.2f}x |"
            )
    return "\n".join(lines)


def plot(table: dict[str, dict[int | None, dict]], budgets: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    figure, (agreement, divergence) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = plt.get_cmap("tab10").colors
    for index, (name, rows) in enumerate(table.items()):
        measured = sorted(b for b in rows if b is not None)
        if None in rows or len(measured) < 2:  # the full cache, and rows of one budget only: no sweep
            continue
        style = {"color": colors[index % len(colors)], "marker": "o", "label": name}
        agreement.plot(measured, [rows[b]["agreement"] for b in measured], **style)
        divergence.plot(measured, [rows[b]["mean_kl"] for b in measured], **style)
    for axes, label in ((agreement, "top-1 agreement with the full cache"), (divergence, "mean KL (nats)")):
        axes.set(xscale="log", xticks=budgets, xticklabels=[str(b) for b in budgets], xlabel="budget", ylabel=label)
        axes.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    agreement.axhline(0.97, color="gray", linestyle=":", label="0.97")
    agreement.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def budget_and_path(text: str) -> tuple[int, Path]:
    budget, _, path = text.partition("=")
    if not budget.isdigit() or not path:
        raise argparse.ArgumentTypeError(f"{text!r}: expected BUDGET=PATH, e.g. 256=results/results.json")
    return int(budget), Path(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=budget_and_path, metavar="BUDGET=PATH")
    parser.add_argument("--output", type=Path, default=Path("long-generation-sweep.png"), help="the PNG to write")
    args = parser.parse_args(argv)
    table = merged_rows(args.runs)
    budgets = sorted({budget for budget, _ in args.runs})
    print(markdown(table, budgets))
    plot(table, budgets, args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
