"""The quality-versus-memory picture (`pareto.png`) and the Markdown report, from results made by hand."""

import math

import matplotlib.image
import pytest
from matplotlib.text import Text

from hf_kvcache.eval.markdown import markdown_table, write_markdown_report, write_report
from hf_kvcache.eval.plots import ParetoPoint, draw_pareto, pareto_front, pareto_points, write_pareto, write_plots
from hf_kvcache.eval.results import CacheResult, EvalResults

MIB = 2**20
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def points(*figures: tuple[float, float]) -> list[ParetoPoint]:
    """Points named a, b, c, ... from (MiB, quality) pairs."""
    return [ParetoPoint(chr(ord("a") + i), mib * MIB, quality) for i, (mib, quality) in enumerate(figures)]


def cache_result(cache: str, perplexity: float, cache_mib: float) -> CacheResult:
    return CacheResult(
        cache=cache,
        spec={"name": cache.partition(":")[0], "params": {}},
        tokens=63,
        perplexity=perplexity,
        mean_nll=math.log(perplexity),
        bucket_size=32,
        bucket_perplexity=[perplexity * 1.1, perplexity * 0.9],
        nll=[math.log(perplexity)] * 63,
        memory_positions=[32, 64],
        memory_bytes=[int(cache_mib * MIB / 2), int(cache_mib * MIB)],
        cache_bytes=int(cache_mib * MIB),
        peak_memory_bytes=900 * MIB,
        peak_memory_kind="rss",
        prefill_tokens_per_s=120.0,
        decode_tokens_per_s=7.5,
    )


@pytest.fixture
def run() -> EvalResults:
    results = EvalResults(
        model="/models/SmolLM2-135M",
        dataset="wikitext2",
        data_source="bundled copy of the WikiText-2 raw test split",
        mode="chunk",
        chunk_size=32,
        max_tokens=64,
        decode_tokens=4,
        seed=7,
        device="cpu",
        dtype="float32",
        versions={"python": "3.11.7", "torch": "2.5.0"},
        results=[
            cache_result("dynamic", 18.11, 180.0),
            cache_result("quantized:bits=4", 18.13, 39.5),
            cache_result("quantized:bits=2", 19.27, 28.7),
            cache_result("window:window=16", 31.7, 36.0),  # dominated by bits=4: fewer bytes, lower perplexity
        ],
    )
    results.fill_ratios()
    return results


def test_front_lower_is_better():
    # a: fewest bytes; b: better than a for more; c: same bytes as b, worse; d: same perplexity as b, more bytes;
    # e: best perplexity, most bytes; f: more bytes than b and worse.
    front = pareto_front(points((10, 20.0), (20, 18.0), (20, 19.0), (40, 18.0), (50, 17.5), (30, 18.5)), True)
    assert front == [True, True, False, False, True, False]


def test_front_higher_is_better():
    # Accuracy: a fewest bytes; b better for more; c same bytes as b, worse; d same accuracy as b, more bytes;
    # e best; f more bytes than a and worse.
    front = pareto_front(points((1, 0.30), (2, 0.45), (2, 0.40), (4, 0.45), (8, 0.60), (3, 0.20)), False)
    assert front == [True, True, False, False, True, False]
    # The same points read as perplexities: only the fewest bytes and the lowest figure at 2 MiB survive.
    assert pareto_front(points((1, 0.30), (2, 0.45), (2, 0.40), (4, 0.45), (8, 0.60), (3, 0.20)), True) == [
        True,
        False,
        False,
        False,
        False,
        True,
    ]


@pytest.mark.parametrize("lower_is_better", [True, False])
def test_front_ties(lower_is_better):
    # Equal points are both optimal; equal bytes: the better figure wins; equal figures: the fewer bytes win.
    assert pareto_front(points((5, 1.0), (5, 1.0)), lower_is_better) == [True, True]
    better, worse = (1.0, 2.0) if lower_is_better else (2.0, 1.0)
    assert pareto_front(points((5, worse), (5, better)), lower_is_better) == [False, True]
    assert pareto_front(points((9, 1.5), (5, 1.5)), lower_is_better) == [False, True]


def test_front_one_point_none_and_all_optimal():
    assert pareto_front(points((3, 9.0)), True) == [True]
    assert pareto_front([], False) == []
    # Every extra MiB buys a better perplexity: nothing is dominated.
    assert pareto_front(points((40, 18.1), (10, 19.3), (20, 18.6), (30, 18.2)), True) == [True] * 4


def test_front_ignores_figures_that_are_not_finite():
    # A diverged perplexity with the fewest bytes is not optimal and does not push out the others.
    assert pareto_front(points((1, math.inf), (2, 20.0), (3, math.nan), (4, 19.0)), True) == [False, True, False, True]


def test_points_from_a_run_and_from_task_rows(run):
    assert pareto_points(run)[1] == ParetoPoint("quantized:bits=4", int(39.5 * MIB), 18.13)
    tasks = [
        {"cache": "dynamic", "spec": "dynamic", "accuracy": 0.5, "mean_cache_bytes": 2048.0},
        {"cache": "quantized", "spec": "quantized:bits=4", "accuracy": 0.25},
    ]
    with pytest.raises(ValueError, match=r"result 1 \(quantized:bits=4\) has no 'mean_cache_bytes'"):
        pareto_points(tasks, quality="accuracy", cache_bytes="mean_cache_bytes", name="spec")
    assert pareto_points(tasks[:1], "accuracy", "mean_cache_bytes", "spec") == [ParetoPoint("dynamic", 2048.0, 0.5)]


@pytest.mark.parametrize(
    ("lower_is_better", "figures"),
    [
        (True, [(1, 0.3), (50, 0.45), (100, 0.6), (100, 0.2)]),  # sizes spanning 100x: a log axis
        (False, [(1, 0.3), (1.5, 0.45), (3, 0.6), (3, 0.2)]),  # 3x: a linear one
        (True, [(0.01, 30.0), (3, 20.0), (5000, 10.0)]),  # over 3 decades: a tick per decade
        (False, [(0, 0.5)]),  # one cache holding nothing
    ],
)
def test_write_pareto_png_opens(tmp_path, lower_is_better, figures):
    path = write_pareto(points(*figures), tmp_path / "pareto.png", "accuracy (%)", lower_is_better, "tiny, 64 tokens")
    assert path == tmp_path / "pareto.png" and path.stat().st_size > 0
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = matplotlib.image.imread(path)
    assert image.shape == (720, 1200, 4)


def test_write_pareto_without_a_finite_point(tmp_path):
    with pytest.raises(ValueError, match="no cache with finite bytes and quality"):
        write_pareto(points((1, math.nan)), tmp_path / "pareto.png", "perplexity", True, "t")


def test_labels_do_not_overlap_points_or_each_other():
    """Ties and near-ties (stacked markers) included; every label inside the axes."""
    names = ["dynamic", "window:window=819", "sink:sink_tokens=4,window=815", "h2o:budget=819", "tova:budget=819"]
    names += ["snapkv:budget=819", "h2o:budget=819,bits=4", "tova:budget=819,bits=4", "snapkv:budget=819,bits=4"]
    figures = [(180, 18.11), (36, 31.7), (36, 19.64), (36, 19.61), (36, 19.95), (36, 19.28)]
    figures += [(11.3, 19.71), (11.3, 20.23), (11.3, 19.51)]
    pts = [ParetoPoint(name, mib * MIB, ppl) for name, (mib, ppl) in zip(names, figures)]
    figure, labels = draw_pareto(pts, "perplexity", True, "ties")
    renderer = figure.canvas.get_renderer()
    frame = figure.axes[0].get_window_extent(renderer)
    for label in labels:
        label.update_positions(renderer)
    # The text alone: an annotation's own extent takes in its leader line.
    boxes = [Text.get_window_extent(label, renderer) for label in labels]
    centres = [figure.axes[0].transData.transform((p.cache_bytes / MIB, p.quality)) for p in pts]
    assert sorted(label.get_text() for label in labels) == sorted(names)
    for i, box in enumerate(boxes):
        assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
        assert not any(box.overlaps(other) for other in boxes[i + 1 :])
        assert not any(box.contains(x, y) for x, y in centres)


def test_write_plots_adds_the_pareto_png(tmp_path, run):
    paths = write_plots(run, tmp_path)
    assert [p.name for p in paths] == ["log_perplexity.png", "cache_memory.png", "pareto.png"]
    assert all(p.read_bytes()[:8] == PNG_SIGNATURE for p in paths)
    for result in run.results:
        result.perplexity = math.nan
    (tmp_path / "diverged").mkdir()
    assert [p.name for p in write_plots(run, tmp_path / "diverged")] == ["log_perplexity.png", "cache_memory.png"]


def test_write_report(tmp_path, run):
    figures = [tmp_path / "pareto.png", tmp_path / "plots" / "cache_memory.png"]
    argv = ["hf-kvcache", "eval", "--max-tokens", "64", "--cache", "dynamic", "--output", "my runs/x"]
    path = write_report(run, tmp_path, figures, command=argv)
    text = path.read_text(encoding="utf-8")
    assert path == tmp_path / "report.md" and text.startswith("# KV-cache evaluation: SmolLM2-135M on wikitext2\n")
    for setting in (
        "- **model**: /models/SmolLM2-135M",
        "- **dataset**: wikitext2 (bundled copy of the WikiText-2 raw test split)",
        "- **tokens**: 64 (63 predicted), then 4 greedy decode steps timed",
        "- **mode**: chunk: chunks of 32 tokens",
        "- **device**: cpu",
        "- **dtype**: float32",
        "- **seed**: 7",
        "- **versions**: python 3.11.7, torch 2.5.0",
    ):
        assert setting + "\n" in text
    assert "```sh\nhf-kvcache eval --max-tokens 64 --cache dynamic --output 'my runs/x'\n```" in text
    header = (
        "| cache | ppl | ppl x | cache MiB | bytes x | peak MiB | prefill tok/s | prefill x | decode tok/s | decode x |"
    )
    assert header + "\n|:---|" + "---:|" * 9 + "\n" in text
    assert "| `quantized:bits=2` | 19.27 | 1.064 | 28.7 | 0.1594 | 900 | 120 | 1 | 7.5 | 1 |" in text
    front = text.split("## Pareto-optimal caches")[1].split("##")[0]
    assert [line for line in front.splitlines() if line.startswith("- ")] == [
        "- `quantized:bits=2`: 28.7 MiB, perplexity 19.27",
        "- `quantized:bits=4`: 39.5 MiB, perplexity 18.13",
        "- `dynamic`: 180 MiB, perplexity 18.11",
    ]
    assert "(lower is better)" in front and "window:window=16" not in front
    assert "](pareto.png)" in text and "](plots/cache_memory.png)" in text and text.endswith("png)\n")


def test_task_accuracy_report_in_one_call(tmp_path):
    tasks = [
        {"cache": "dynamic", "accuracy": 0.75, "mean_cache_bytes": 40 * MIB},
        {"cache": "quantized:bits=2", "accuracy": 0.75, "mean_cache_bytes": 8 * MIB},
        {"cache": "window:window=64", "accuracy": 0.5, "mean_cache_bytes": 8 * MIB},
    ]
    rows = [{"cache": t["cache"], "accuracy": t["accuracy"], "cache MiB": t["mean_cache_bytes"] / MIB} for t in tasks]
    path = write_markdown_report(
        tmp_path / "tasks",
        "Task accuracy",
        {"model": "tiny", "task": "needle"},
        rows,
        points=pareto_points(tasks, "accuracy", "mean_cache_bytes"),
        lower_is_better=False,
        quality_label="accuracy",
        figures=[tmp_path / "tasks" / "pareto.png"],
    )
    text = path.read_text(encoding="utf-8")
    assert "| `window:window=64` | 0.5 | 8 |" in text and "- **task**: needle" in text
    assert "(higher is better)" in text and "- `quantized:bits=2`: 8 MiB, accuracy 0.75" in text
    assert "`dynamic`: 40" not in text and "Produced by" not in text and "](pareto.png)" in text


def test_markdown_table_escapes_and_aligns():
    table = markdown_table([{"name": "a|b", "value": 12345.6, "note": "-"}, {"name": "c", "value": 2, "note": "x"}])
    assert table.splitlines() == [
        "| name | value | note |",
        "|:---|---:|:---|",
        "| `a\\|b` | 12,346 | - |",
        "| `c` | 2 | x |",
    ]
    assert markdown_table([]) == "(no results)"
