"""benchmarks/retrieval.py on a tiny random model: prompt split, compress-once path, skipped specs, a whole run."""

import json
import runpy
from pathlib import Path

import pytest
import torch
from conftest import byte_tokenizer, make_tiny_model, save_tiny_model_folder
from transformers import AutoTokenizer, DynamicCache

from hf_kvcache import CACHE_KWARG, build_cache, registry
from hf_kvcache.eval.task_eval import prompt_ids
from hf_kvcache.eval.tasks import TASKS, generate_sample

pytestmark = pytest.mark.usefixtures("one_thread")

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "retrieval.py"
CHAT_TEMPLATE = "{% for m in messages %}<u>{{ m['content'] }}</u>{% endfor %}<a>"


@pytest.fixture(scope="module")
def bench() -> dict:
    """The benchmark script's namespace (it is a script, not a module of the package)."""
    return runpy.run_path(str(SCRIPT), run_name="retrieval_benchmark")


class CompressOnceCache(DynamicCache):
    """A full cache that takes its context through `compress_context` (and records what it got)."""

    def __init__(self, config):
        super().__init__(config=config)
        self.compressed: torch.Tensor | None = None

    def compress_context(self, model, context_ids: torch.Tensor, tokenizer=None) -> None:
        self.compressed, self.tokenizer = context_ids, tokenizer
        model(context_ids, **{CACHE_KWARG: self}, use_cache=True)


def test_compress_once_is_the_cache_or_its_policy_protocol(bench):
    config = make_tiny_model("llama").config
    cache = CompressOnceCache(config)
    assert bench["compresses_once"](cache) and not bench["compresses_once"](DynamicCache())
    assert bench["compresses_once"](build_cache("kvzip:budget=8", config))
    assert not bench["compresses_once"](build_cache("snapkv:budget=64", config))  # offers compress_context, too
    cache.compresses_once = False  # the cache's own word comes first
    assert not bench["compresses_once"](cache)


@pytest.fixture
def compress_once_registered(monkeypatch) -> list[CompressOnceCache]:
    """A `compress-once` cache registered for this test only; the caches built are listed."""
    built: list[CompressOnceCache] = []

    def factory(config):
        built.append(CompressOnceCache(config))
        return built[-1]

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry.registered_caches()))
    registry.register_cache("compress-once", factory, "test: a full cache filled by compress_context")
    return built


@pytest.mark.parametrize("task", sorted(TASKS))
def test_sample_prompt_is_context_then_question(task):
    sample = generate_sample(task, byte_tokenizer(), 800, seed=2, index=1)
    assert sample.question and sample.prompt == sample.context + sample.question
    assert sample.context.endswith("\n\n") and "?" in sample.question
    for needle in sample.needles:  # every needle is in the context, before the question
        assert sample.context[needle.char_offset :].startswith(needle.text)


@pytest.mark.parametrize("chat_template", [None, CHAT_TEMPLATE])
def test_prompt_parts_join_to_the_evaluated_prompt(bench, chat_template):
    tokenizer = byte_tokenizer(chat_template)
    sample = generate_sample("passkey", tokenizer, 800, seed=0, index=3)
    context, question = bench["prompt_parts"](tokenizer, sample)
    assert torch.equal(torch.cat([context, question], dim=1), prompt_ids(tokenizer, sample))
    assert tokenizer.decode(question[0]).startswith(sample.question)
    assert sample.answers[0] in tokenizer.decode(context[0])  # the pass key is in the context


def test_prompt_parts_with_the_packaged_tokenizer(bench):
    """SmolLM2's chat template and BPE: the two parts tokenized apart give task_eval's prompt exactly."""
    from hf_kvcache.models import default_model_path

    try:
        tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    except RuntimeError as error:  # the packaged model is not installed
        pytest.skip(str(error))
    for index in range(3):
        sample = generate_sample("passkey", tokenizer, 800, seed=0, index=index)
        context, question = bench["prompt_parts"](tokenizer, sample)
        assert torch.equal(torch.cat([context, question], dim=1), prompt_ids(tokenizer, sample))
        assert context.shape[1] + question.shape[1] <= 800 + 64  # the template adds a few dozen tokens


def test_compress_once_matches_one_prefill_for_a_full_cache(bench, compress_once_registered):
    tokenizer, model = byte_tokenizer(), make_tiny_model("llama")
    sample = generate_sample("passkey", tokenizer, 400, seed=0, index=0)
    context, question = bench["prompt_parts"](tokenizer, sample)
    one = bench["answer_sample"](model, tokenizer, "dynamic", context, question, 6)
    twice = bench["answer_sample"](model, tokenizer, "compress-once", context, question, 6)
    (cache,) = compress_once_registered
    assert torch.equal(cache.compressed, context) and cache.tokenizer is tokenizer
    assert (one["compressed_once"], twice["compressed_once"]) == (False, True)
    assert twice["generated"] == one["generated"] and len(one["generated"]) > 0
    assert twice["cache_bytes"] == one["cache_bytes"] > 0
    assert cache.get_seq_length() == context.shape[1] + question.shape[1] + 5  # the last token is not fed


def test_unregistered_default_names_are_skipped_in_one_line(bench, capsys):
    templates = ["window:window={budget}", "no-such:budget={budget}", "no-such:budget={budget},x=1"]
    assert bench["available_templates"](templates, explicit=False) == ["dynamic", "window:window={budget}"]
    assert capsys.readouterr().out.splitlines() == ["skipping no-such: not registered"]
    with pytest.raises(SystemExit, match="no-such"):
        bench["available_templates"](templates, explicit=True)
    with pytest.raises(ValueError, match="no parameter"):  # a registered name with a wrong parameter fails early
        bench["available_templates"](["window:budget={budget}"], explicit=False)


def test_a_spec_refused_at_some_budget_stops_the_run_before_any_forward(bench, monkeypatch):
    def picky(config, budget: int = 64):
        if budget < 32:
            raise ValueError(f"budget={budget} must be at least 32")
        return DynamicCache(config=config)

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry.registered_caches()))
    registry.register_cache("picky", picky, "test: refuses small budgets")
    config = make_tiny_model("llama").config
    bench["check_buildable"](config, ["dynamic", "picky:budget={budget}"], [128, 32])
    with pytest.raises(SystemExit, match="picky:budget=25: budget=25 must be at least 32"):
        bench["check_buildable"](config, ["dynamic", "picky:budget={budget}"], [128, 25])


class BrokenCache(DynamicCache):
    def update(self, *args, **kwargs):
        raise RuntimeError("broken on purpose")


def test_a_failing_spec_is_recorded_and_the_others_still_run(bench, monkeypatch, capsys):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry.registered_caches()))
    registry.register_cache("broken", lambda config: BrokenCache(config=config), "test: every forward fails")
    tokenizer, model = byte_tokenizer(), make_tiny_model("llama")
    samples = [generate_sample("passkey", tokenizer, 300, seed=0, index=0)]
    templates = ["dynamic", "broken", "window:window={budget}"]
    rows = bench["retrieval_rows"](model, tokenizer, templates, [64], samples, 2)
    assert [row["cache"] for row in rows] == ["dynamic", "broken", "window:window=64"]
    assert rows[1]["error"] == "RuntimeError: broken on purpose" and "accuracy" in rows[2]
    assert "FAILED broken: RuntimeError: broken on purpose" in capsys.readouterr().out
    ppl, _, _ = bench["perplexity_rows"](model, tokenizer, templates, "some text " * 20, 64, 0.5, 16)
    assert "error" in ppl[1] and "perplexity" in ppl[2]
    summary = bench["summary_table"](templates, [64], rows, ppl, 32)
    assert summary[1] == {"cache": "broken", "acc@64": "error", "MiB@64": "error", "ppl@32": "error"}


def test_default_specs_name_every_policy(bench):
    names = {template.partition(":")[0] for template in bench["DEFAULT_TEMPLATES"]}
    policies = {"knorm", "streaming-llm", "expected-attention", "pyramidkv", "adakv", "kvzip"}
    assert {"window", "sink", "h2o", "tova", "snapkv"} | policies <= names
    quick = bench["one_per_cache"](bench["DEFAULT_TEMPLATES"])
    quick_names = [template.partition(":")[0] for template in quick]
    assert sorted(quick_names) == sorted(names) and quick[0] == bench["DEFAULT_TEMPLATES"][0]


def test_quick_run_writes_tables_and_json(bench, tmp_path, capsys):
    folder = save_tiny_model_folder(tmp_path / "model")
    output = tmp_path / "retrieval.json"
    argv = ["--model", str(folder), "--quick", "--ppl-tokens", "160", "--output", str(output)]
    argv += ["--specs", "window:window={budget}", "h2o:budget={budget},per_head=true", "--prompt-tokens", "500"]
    result = bench["main"](argv)
    assert json.loads(output.read_text()) == json.loads(json.dumps(result, default=str))
    assert result["command"].startswith("python benchmarks/retrieval.py --model ")
    assert "--quick" in result["command"] and "'h2o:budget={budget},per_head=true'" in result["command"]
    rows = result["passkey"]
    assert [row["cache"] for row in rows] == ["dynamic", "window:window=128", "h2o:budget=128,per_head=true"]
    assert all(row["found"].endswith("/2") for row in rows)
    for sample in result["samples"]:  # a prompt is short of its length by less than a haystack word
        assert 500 - 24 < sample["context_ids"] + sample["question_ids"] <= 500
    full, window, h2o = (row["mean_cache_bytes"] for row in rows)
    assert max(window, h2o) < full / 3  # 128 of ~500 tokens held
    assert [row["cache"] for row in result["perplexity"]] == [
        "dynamic",
        "window:window=32",
        "h2o:budget=32,per_head=true",
    ]
    assert list(result["summary"][0]) == ["cache", "acc@128", "MiB@128", "ppl@32"]
    out = capsys.readouterr().out
    assert "acc@128" in out and f"wrote {output}" in out
