"""The lm-evaluation-harness model type on local tasks: the dynamic cache scores as the harness's `hf`
model does, other caches change the scores, and `hf-kvcache lm-eval` runs the harness's own command."""

import json
import math

import lm_eval
import pytest
from conftest import byte_tokenizer, make_tiny_model
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager

from hf_kvcache.eval.harness import MODEL_TYPE, CacheLM

WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "seven",
    "cats",
    "watch",
    "from",
    "an",
    "old",
    "red",
    "barn",
]
TASKS = ["kv_choice", "kv_rolling", "kv_generate"]


def local_tasks(folder) -> TaskManager:
    """Three tasks over local JSON files, one per request type: multiple choice (loglikelihood), rolling
    loglikelihood (perplexity) and generate_until."""
    rows = [
        {
            "question": " ".join(WORDS[i % 7 : i % 7 + 5]) + " is",
            "choices": [" red", " blue", " green"],
            "answer": i % 3,
            "text": " ".join(WORDS[(i + j) % len(WORDS)] for j in range(60)),
            "target": WORDS[i % len(WORDS)],
        }
        for i in range(6)
    ]
    (folder / "docs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    common = (
        f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / 'docs.jsonl'}\ntest_split: test\n"
    )
    (folder / "kv_choice.yaml").write_text(
        f"task: kv_choice\n{common}output_type: multiple_choice\ndoc_to_text: '{{{{question}}}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n"
    )
    (folder / "kv_rolling.yaml").write_text(
        f"task: kv_rolling\n{common}output_type: loglikelihood_rolling\ndoc_to_text: ''\n"
        "doc_to_target: '{{text}}'\nmetric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n"
    )
    (folder / "kv_generate.yaml").write_text(
        f"task: kv_generate\n{common}output_type: generate_until\ndoc_to_text: '{{{{question}}}}'\n"
        "doc_to_target: '{{target}}'\ngeneration_kwargs:\n  until: ['.']\n  max_gen_toks: 6\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n"
    )
    return TaskManager(include_path=str(folder))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tokenizer = byte_tokenizer()
    tokenizer.eos_token = "!"  # the harness scores empty contexts after EOS and stops generation at it
    return make_tiny_model("llama"), tokenizer, local_tasks(tmp_path_factory.mktemp("tasks"))


def evaluate(lm, tasks):
    out = lm_eval.simple_evaluate(model=lm, tasks=TASKS, task_manager=tasks, log_samples=True, verbosity="ERROR")
    return out["results"], out["samples"]


def scores(samples) -> dict[str, list]:
    """Per task, every sample's filtered responses in document order."""
    return {
        task: [s["filtered_resps"] for s in sorted(rows, key=lambda s: s["doc_id"])] for task, rows in samples.items()
    }


def close(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(close(a[key], b[key]) for key in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(close(x, y) for x, y in zip(a, b))
    if isinstance(a, float):
        return math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-4)
    return a == b


def test_the_dynamic_cache_scores_as_the_harness_hf_model(setup):
    model, tokenizer, tasks = setup
    reference_results, reference = evaluate(HFLM(pretrained=model, tokenizer=tokenizer, batch_size=2), tasks)
    lm = CacheLM(pretrained=model, tokenizer=tokenizer, cache="dynamic", chunk_size=7, batch_size=2)
    results, ours = evaluate(lm, tasks)
    assert close(scores(ours), scores(reference)), (scores(ours), scores(reference))
    for task in TASKS:
        for metric, value in reference_results[task].items():
            if isinstance(value, float):
                assert math.isclose(results[task][metric], value, rel_tol=1e-4), (task, metric)
    assert all(text for rows in scores(ours)["kv_generate"] for text in rows)  # something was generated


@pytest.mark.parametrize(
    "spec", [{"cache": "quantized", "bits": 2, "residual_length": 16, "group_size": 16}, {"cache": "window:window=32"}]
)
def test_other_caches_change_the_scores(setup, spec):
    model, tokenizer, tasks = setup
    dynamic = scores(evaluate(CacheLM(pretrained=model, tokenizer=tokenizer, chunk_size=16), tasks)[1])
    cache = scores(evaluate(CacheLM(pretrained=model, tokenizer=tokenizer, chunk_size=16, **spec), tasks)[1])
    assert not close(cache["kv_rolling"], dynamic["kv_rolling"])  # 60-word texts outgrow the window / residual


def test_bad_specs_are_refused_naming_them(setup):
    model, tokenizer, _ = setup
    with pytest.raises(ValueError, match="has no parameter 'colour'"):
        CacheLM(pretrained=model, tokenizer=tokenizer, cache="quantized", colour=2)
    with pytest.raises(ValueError, match="unknown cache 'nope'"):
        CacheLM(pretrained=model, tokenizer=tokenizer, cache="nope")
    with pytest.raises(ValueError, match="bits=5"):
        CacheLM(pretrained=model, tokenizer=tokenizer, cache="quantized", bits=5)
    with pytest.raises(ValueError, match="chunk_size=0"):
        CacheLM(pretrained=model, tokenizer=tokenizer, chunk_size=0)


def test_the_model_type_is_registered():
    from lm_eval.api.registry import get_model

    assert get_model(MODEL_TYPE) is CacheLM


@pytest.mark.real_model
def test_the_command_runs_the_harness_on_the_packaged_model(real_model, tmp_path, capsys):
    from hf_kvcache.cli import main

    local_tasks(tmp_path)
    argv = ["lm-eval", "--cache", "window:window=64", "--chunk-size", "32", "--tasks", *TASKS]
    argv += ["--include_path", str(tmp_path), "--limit", "2", "--output_path", str(tmp_path / "out")]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "hf-kvcache ({'pretrained': 'packaged', 'cache': 'window', 'window': 64, 'chunk_size': 32})" in printed
    assert all(f"|{task}" in printed for task in TASKS) and "word_perplexity" in printed
    (written,) = (tmp_path / "out").rglob("results_*.json")  # the harness's own output file
    results = json.loads(written.read_text())["results"]
    assert results["kv_rolling"]["word_perplexity,none"] > 1 and 0 <= results["kv_choice"]["acc,none"] <= 1


def test_the_command_refuses_a_bad_spec_before_loading_anything(capsys):
    from hf_kvcache.cli import main

    assert main(["lm-eval", "--cache", "quantized:colour=5", "--tasks", "kv_choice"]) == 2
    assert "has no parameter 'colour'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "--tasks", "kv_choice"])  # other commands still refuse options they do not know
