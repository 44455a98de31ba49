"""The long-context task generators (needle present, answer unique, length, determinism) and their evaluation."""

import re
from collections import Counter
from itertools import pairwise

import pytest
from conftest import byte_tokenizer, make_tiny_model
from transformers import AutoTokenizer

from hf_kvcache.eval import tasks
from hf_kvcache.eval.task_eval import TaskResult, evaluate_task
from hf_kvcache.eval.tasks import (
    COMMON_TOP_K,
    TASKS,
    Sample,
    book_text,
    count_tokens,
    generate_sample,
    generate_samples,
    score,
)

pytestmark = pytest.mark.usefixtures("one_thread")

# (context_tokens, seed) per tokenizer: one length near each task's minimum, one longer.
LENGTHS = {"bytes": [(800, 0), (2500, 3)], "smollm2": [(400, 1), (2048, 0)]}
# A prompt falls short of its target by less than one haystack word (plus a token at a needle's seam).
TOLERANCE = {"bytes": 24, "smollm2": 8}


@pytest.fixture(scope="module", params=["bytes", "smollm2"])
def tokenizer(request):
    """The byte-level tokenizer, and SmolLM2's (read from the converted packaged model; skipped without it)."""
    if request.param == "bytes":
        return "bytes", byte_tokenizer()
    from hf_kvcache.models import default_model_path

    try:
        return "smollm2", AutoTokenizer.from_pretrained(default_model_path())
    except RuntimeError as error:  # the packaged model is not installed
        pytest.skip(str(error))


def without_needles(sample: Sample) -> str:
    text = sample.text
    for needle in sorted(sample.needles, key=lambda needle: -needle.char_offset):
        text = text[: needle.char_offset] + text[needle.char_offset + len(needle.text) :]
    return text


def mentions(text: str, word: str) -> int:
    return len(re.findall(rf"(?<![A-Za-z0-9]){re.escape(word)}(?![A-Za-z0-9])", text, re.IGNORECASE))


def check_variable_chains(sample: Sample) -> None:
    """Reading the assignments in order resolves every variable; exactly the answers hold the asked value."""
    values: dict[str, str] = {}
    for name, source in re.findall(r"VAR ([A-Z]{5}) = (VAR [A-Z]{5}|\d{5})", sample.prompt):
        assert name not in values  # each variable is assigned once
        values[name] = values[source[4:]] if source.startswith("VAR ") else source  # KeyError: out of order
    asked = re.search(r"the value (\d{5})", sample.prompt).group(1)
    assert sorted(name for name, value in values.items() if value == asked) == sorted(sample.answers)
    assert len(set(values.values())) == 2


def check_common_words(sample: Sample) -> None:
    counts = Counter(re.findall(r"^\d+\. (\w+)$", sample.prompt, re.MULTILINE))
    assert len(sample.answers) == COMMON_TOP_K
    others = [count for word, count in counts.items() if word not in sample.answers]
    assert min(counts[word] for word in sample.answers) > max(others)
    assert all(mentions(sample.prompt, word) == counts[word] for word in counts)  # nothing outside the list


@pytest.mark.parametrize("task", list(TASKS))
def test_samples_hold_their_needles_and_unique_answers(tokenizer, task):
    kind, tokenizer = tokenizer
    for context_tokens, seed in LENGTHS[kind]:
        for sample in generate_samples(task, tokenizer, context_tokens, samples=2, seed=seed):
            assert sample.task == task and sample.seed == seed
            assert sample.context_tokens == count_tokens(tokenizer, sample.text)
            assert context_tokens - TOLERANCE[kind] <= sample.context_tokens <= context_tokens
            assert sample.text.endswith(sample.answer_prefix)
            for needle in sample.needles:
                assert sample.text[needle.char_offset :].startswith(needle.text)
                assert needle.token_offset == count_tokens(tokenizer, sample.text[: needle.char_offset])
                assert 0 <= needle.depth <= 1
            assert [needle.depth for needle in sample.needles] == sorted(needle.depth for needle in sample.needles)
            if task == "common_words":
                check_common_words(sample)
                continue
            # The answers come from the needles only: the book text and the template never hold them.
            assert not any(mentions(without_needles(sample), answer) for answer in sample.answers)
            assert all(any(mentions(needle.text, answer) for needle in sample.needles) for answer in sample.answers)
            start, end = sample.passage
            haystack = " ".join(without_needles(sample).split())
            assert " ".join(book_text()[start:end].split()) in haystack  # the book's passage, needles aside
            if task == "variable_tracking":
                check_variable_chains(sample)
            else:
                assert all(mentions(sample.text, answer) == 1 for answer in sample.answers)
            if task == "multikey":
                keys = [re.search(r"for (\S+) is", needle.text).group(1) for needle in sample.needles]
                asked = re.search(r"for (\S+) hidden", sample.prompt).group(1)
                assert len(set(keys)) == len(keys) and keys.count(asked) == 1
            if task == "multivalue":
                assert len(set(sample.answers)) == len(sample.answers) == len(sample.needles)


@pytest.mark.parametrize("task", list(TASKS))
def test_samples_are_deterministic_and_read_different_passages(tokenizer, task):
    _, tokenizer = tokenizer
    samples = generate_samples(task, tokenizer, 1000, samples=4, seed=5)
    assert samples == generate_samples(task, tokenizer, 1000, samples=4, seed=5)
    assert generate_sample(task, tokenizer, 1000, seed=5, index=2) == samples[2]  # independent of the others
    assert generate_sample(task, tokenizer, 1000, seed=6, index=0).prompt != samples[0].prompt
    ranges = sorted(sample.passage for sample in samples)
    assert all(end <= next_start for (_, end), (next_start, _) in pairwise(ranges))  # disjoint passages
    assert len({sample.answers for sample in samples}) == 4


def sample_with(task: str, answers: tuple[str, ...]) -> Sample:
    return Sample(task, 0, 0, "prompt", "prefix", answers, (), 10, (0, 1))


def test_score_counts_whole_answers():
    passkey = sample_with("passkey", ("71432",))
    assert score(passkey, " 71432. Remember it.") == 1.0
    assert score(passkey, "The pass key is 714325") == 0.0  # a longer number is another number
    assert score(passkey, "7143") == 0.0
    assert score(sample_with("word", ("zebra",)), "ZEBRA!") == 1.0
    multivalue = sample_with("multivalue", ("11111", "22222", "33333", "44444"))
    assert score(multivalue, "11111, 33333 and 99999") == 0.5
    assert score(sample_with("variable_tracking", ("ABCDE", "FGHIJ")), "VAR ABCDE, VAR FGHIJ") == 1.0


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"task": "needle"}, "task='needle' is not supported; accepted values: passkey, word, multikey"),
        ({"context_tokens": 50}, "context_tokens=50 is too short for task 'passkey'"),
        ({"context_tokens": 10**7}, "context_tokens=10000000 is longer than the bundled book allows"),
        ({"context_tokens": 512.0}, "context_tokens=512.0 must be an integer >= 1"),
        ({"samples": 0}, "samples=0 must be an integer >= 1"),
        ({"seed": -1}, "seed=-1 must be an integer >= 0"),
    ],
)
def test_bad_parameters_are_refused(arguments, message):
    parameters = {"task": "passkey", "context_tokens": 512, "samples": 1, "seed": 0} | arguments
    with pytest.raises(ValueError, match=re.escape(message)):
        generate_samples(tokenizer=byte_tokenizer(), **parameters)


def test_too_short_context_names_the_minimum():
    with pytest.raises(ValueError, match=r"variable_tracking.*accepted: context_tokens >= \d+"):
        generate_sample("variable_tracking", byte_tokenizer(), 300)


def test_a_list_longer_than_the_book_has_words_is_refused(monkeypatch):
    monkeypatch.setattr(tasks, "RARE_COUNT", 1)  # each word once: the book's words fill fewer tokens
    with pytest.raises(ValueError, match=r"context_tokens=200000 is too long for task 'common_words': the \d+ "):
        generate_sample("common_words", byte_tokenizer(), 200_000)


def test_evaluate_task_on_a_tiny_model():
    model, tokenizer = make_tiny_model("llama"), byte_tokenizer()
    samples = generate_samples("multivalue", tokenizer, 600, samples=3, seed=0)
    done = []
    result = evaluate_task(model, tokenizer, "window:window=128", samples, max_new_tokens=4, progress=done.append)
    assert (result.cache, result.spec, result.task) == ("window", "window:window=128", "multivalue")
    assert 0 <= result.accuracy <= 1 and done == [1, 1, 1]
    assert [record["index"] for record in result.samples] == [0, 1, 2]
    for record in result.samples:
        assert 600 - 24 <= record["context_tokens"] <= 600  # no chat template: the raw text
        assert record["score"] in (0, 0.25, 0.5, 0.75, 1) and len(record["depths"]) == 4
        assert record["cache_bytes"] > 0 and record["new_tokens"] <= 4
        assert record["seconds"] >= record["prefill_seconds"] + record["decode_seconds"] > 0
    assert result.mean_cache_bytes > 0 and result.decode_tokens_per_s > 0
    # Shards joined give the same result as one run.
    first = evaluate_task(model, tokenizer, "window:window=128", samples[:1], max_new_tokens=4)
    rest = evaluate_task(model, tokenizer, "window:window=128", samples[1:], max_new_tokens=4)
    joined = TaskResult.from_samples("window", "window:window=128", "multivalue", first.samples + rest.samples)
    assert joined.accuracy == result.accuracy and joined.mean_cache_bytes == result.mean_cache_bytes
    with pytest.raises(ValueError, match="samples mix tasks multivalue, passkey"):
        evaluate_task(model, tokenizer, "dynamic", [*samples, generate_sample("passkey", tokenizer, 600)])
    with pytest.raises(ValueError, match=r"samples=\[\] holds no sample"):
        evaluate_task(model, tokenizer, "dynamic", [])


@pytest.mark.real_model
def test_passkey_needs_the_full_cache(real_model):
    model, tokenizer = real_model
    samples = generate_samples("passkey", tokenizer, 1000, samples=4, seed=0)
    full = evaluate_task(model, tokenizer, "dynamic", samples)
    window = evaluate_task(model, tokenizer, "window:window=64", samples)
    assert full.accuracy >= 0.75, full.samples
    assert window.accuracy <= full.accuracy
    assert window.mean_cache_bytes < full.mean_cache_bytes
