"""A policy's `select` and `score` are checked where the caches call them: duplicate, unordered, out-of-range
or too many indices, masks keeping more than the layer's budget, and non-finite scores are refused, naming
the policy, what it returned and what is accepted; correct policies are unaffected."""

import dataclasses
import itertools

import pytest
import torch
from conftest import make_tiny_model
from helpers import chunked_logits, observe, policy_layer, random_ids, store_tokens
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_kvcache import EvictionCache, enable_score_capture
from hf_kvcache.policies import AdaKV, EvictionPolicy, Knorm
from hf_kvcache.policies.base import PolicyOutputError, Step, selected_indices, selected_mask

pytestmark = pytest.mark.usefixtures("one_thread")


@dataclasses.dataclass(frozen=True)
class Returns(EvictionPolicy):
    """A user policy whose `select` returns `make(step, budget)`."""

    make: object = None

    def select(self, step, budget):
        return self.make(step, budget)


@dataclasses.dataclass(frozen=True)
class Scores(EvictionPolicy):
    """A user policy whose `score` returns `make(step)` (kept by the default `select`, `keep_top`)."""

    make: object = None

    def score(self, step):
        return self.make(step)


def full_layer(policy, batch: int = 1, tokens: int = 6):
    layer = policy_layer(policy)
    keys = torch.arange(batch * 2 * tokens, dtype=torch.float32).view(batch, 2, tokens, 1)
    store_tokens(layer, keys, keys.clone())
    return layer


def long(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.long)


# Budget 3 over 6 stored tokens, one batch row, two KV heads.
BAD_SELECTIONS = {
    "duplicate": (lambda s, b: long([[[0, 0, 5], [1, 2, 3]]]), r"index 0 more than once \(at batch row 0, head 0"),
    "descending": (lambda s, b: long([[[5, 2, 0]]]), r"not in ascending order \(at batch row 0, head 0: \[5, 2, 0\]"),
    "too many": (lambda s, b: long([[[0, 1, 2, 3]]]), r"indices of shape \(1, 1, 4\)"),
    "past the end": (lambda s, b: long([[[0, 1, 6]]]), r"index 6 outside 0 \.\. 5"),
    "negative": (lambda s, b: long([[[-1, 1, 2]]]), r"index -1 outside 0 \.\. 5"),
    "float": (lambda s, b: torch.tensor([[[0.0, 1.0, 2.0]]]), r"returned a torch\.float32 tensor"),
    "bool mask": (lambda s, b: torch.ones(1, 2, 6, dtype=torch.bool), r"returned a torch\.bool tensor"),
    "list": (lambda s, b: [[[0, 1, 2]]], r"returned list"),
    "other batch": (lambda s, b: long([[[0, 1, 2]]] * 2), r"indices of shape \(2, 1, 3\)"),
    "three heads": (lambda s, b: long([[[0, 1, 2]] * 3]), r"indices of shape \(1, 3, 3\)"),
    "flat": (lambda s, b: long([0, 1, 2]), r"indices of shape \(3,\)"),
}


@pytest.mark.parametrize("case", BAD_SELECTIONS, ids=list(BAD_SELECTIONS))
def test_a_bad_selection_is_refused_naming_the_policy_and_what_is_accepted(case):
    make, message = BAD_SELECTIONS[case]
    layer = full_layer(Returns(budget=3, make=make))
    with pytest.raises(PolicyOutputError, match=message) as refused:
        observe(layer)
    text = str(refused.value)
    assert text.startswith("Returns.select(step, budget): ")
    assert "accepted: an integer tensor [batch, heads or 1, at most budget] = [1, 2 or 1, <= 3]" in text
    assert "strictly ascending indices into the 6 stored tokens (0 .. 5)" in text
    assert layer.stored_tokens == 6  # nothing was kept from the bad selection


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (float("nan"), r"got nan for stored token 2 of batch row 0, head 1 \(1 non-finite scores in all\)"),
        (float("inf"), r"got inf for stored token 2"),
        (float("-inf"), r"got -inf for stored token 2"),
    ],
)
def test_non_finite_scores_at_real_tokens_are_refused_naming_the_policy(value, message):
    def make(step):
        scores = torch.arange(step.stored, dtype=torch.float32).expand(*step.real.shape).clone()
        scores[0, 1, 2] = value
        return scores

    with pytest.raises(PolicyOutputError, match=r"^Scores\.select\(step, budget\): .*must be finite.*" + message):
        observe(full_layer(Scores(budget=3, make=make)))


def test_scores_of_another_kind_or_batch_are_refused():
    for make, message in (
        (lambda step: step.real, r"real-valued torch\.Tensor, got a torch\.bool tensor"),
        (lambda step: [0.0] * step.stored, r"real-valued torch\.Tensor, got list"),
        (lambda step: torch.zeros(2, 2, step.stored), r"= \[1, 2 or 1, 6\], got \(2, 2, 6\)"),
    ):
        with pytest.raises(PolicyOutputError, match=r"^Scores\.select\(step, budget\): .*" + message):
            observe(full_layer(Scores(budget=3, make=make)))


def test_non_finite_scores_at_padding_are_masked_not_refused():
    layer = full_layer(Scores(budget=3, make=lambda step: torch.where(step.real, step.positions.float(), torch.nan)))
    layer.real[0, :, :2] = False  # two padding tokens (left padding)
    observe(layer)
    assert layer.kept_positions() == [[[3, 4, 5], [3, 4, 5]]]


def test_correct_selections_are_kept_as_returned():
    """Fewer than budget, one head shared by all, int32: accepted, kept as given."""
    for make, kept in (
        (lambda s, b: long([[[1, 4]]]), [[[1, 4], [1, 4]]]),
        (lambda s, b: torch.tensor([[[0, 2, 5], [1, 3, 4]]], dtype=torch.int32), [[[0, 2, 5], [1, 3, 4]]]),
        (lambda s, b: long([[[]]]).view(1, 1, 0), [[[], []]]),
    ):
        layer = full_layer(Returns(budget=3, make=make))
        observe(layer)
        assert layer.kept_positions() == kept


def test_a_correct_user_policy_equals_the_builtin_reference():
    """A user's Knorm written as its own `select` (topk, sorted) gives Knorm's logits and kept tokens."""

    @dataclasses.dataclass(frozen=True)
    class MyKnorm(EvictionPolicy):
        def select(self, step, budget):
            norms = step.keys.float().norm(dim=-1)
            return (-norms).sort(dim=-1, descending=True, stable=True).indices[..., :budget].sort(-1).values

    model = enable_score_capture(make_tiny_model("llama"))
    ids = random_ids(model, 2, 30)
    mine, reference = EvictionCache(model.config, MyKnorm(budget=10)), EvictionCache(model.config, Knorm(budget=10))
    assert torch.equal(chunked_logits(model, ids, mine, chunk=7), chunked_logits(model, ids, reference, chunk=7))
    assert [layer.kept_positions() for layer in mine.layers] == [layer.kept_positions() for layer in reference.layers]


def test_a_bad_user_policy_fails_in_a_real_model_with_its_name():
    @dataclasses.dataclass(frozen=True)
    class Sloppy(EvictionPolicy):  # topk without sorting: descending scores, not ascending positions
        def select(self, step, budget):
            return step.keys.float().norm(dim=-1).topk(budget, dim=-1).indices

    model = enable_score_capture(make_tiny_model("llama"))
    with pytest.raises(PolicyOutputError, match=r"^Sloppy\.select\(step, budget\): returned indices not in ascending"):
        chunked_logits(model, random_ids(model, 1, 30), EvictionCache(model.config, Sloppy(budget=10)), chunk=30)


# --- ragged policies: a bool mask, the layer's budget shared among its heads ------------------------------
@dataclasses.dataclass(frozen=True)
class RaggedReturns(AdaKV):
    make: object = None

    def select(self, step, budget):
        return self.make(step, budget)


def ragged_step(batch: int = 1, heads: int = 2, stored: int = 8) -> Step:
    real = torch.ones(batch, heads, stored, dtype=torch.bool)
    positions = torch.arange(stored, dtype=torch.int32).expand(batch, heads, -1)
    return Step(None, 1, stored, stored, real, positions, {}, {}, lambda: None, torch.rand(batch, heads, stored))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda s, b: torch.ones(1, 2, 8, dtype=torch.bool), r"kept 16 tokens in batch row 0"),
        (lambda s, b: torch.ones(1, 1, 8, dtype=torch.bool), r"kept 16 tokens in batch row 0"),
        (lambda s, b: long([[[0, 1], [2, 3]]]), r"returned a torch\.int64 tensor"),
        (lambda s, b: torch.zeros(1, 2, 9, dtype=torch.bool), r"returned a mask of shape \(1, 2, 9\)"),
        (lambda s, b: None, r"returned NoneType"),
    ],
)
def test_a_bad_ragged_mask_is_refused_naming_the_policy(make, message):
    policy = RaggedReturns(budget=4, observation_window=1, make=make)
    with pytest.raises(PolicyOutputError, match=r"^RaggedReturns\.select\(step, budget\): " + message) as refused:
        selected_mask(policy, ragged_step(), 4)
    assert "keeping at most budget x heads = 8 real tokens per batch row" in str(refused.value)


def test_adakv_masks_pass_and_padding_is_dropped():
    step = ragged_step()
    step.real[0, 0, 0] = False
    policy = AdaKV(budget=4, observation_window=1, kernel_size=1)
    assert torch.equal(selected_mask(policy, step, 4), policy.select(step, 4) & step.real)
    nan = ragged_step()
    nan.attention[0, 1, 3] = float("nan")
    with pytest.raises(PolicyOutputError, match=r"^AdaKV\.select\(step, budget\): .*got nan for stored token 3"):
        selected_mask(policy, nan, 4)


def test_a_bad_ragged_policy_fails_in_a_real_model_with_its_name():
    model = enable_score_capture(make_tiny_model("llama"))
    policy = RaggedReturns(budget=4, observation_window=1, make=lambda s, b: torch.ones_like(s.real))
    with pytest.raises(PolicyOutputError, match=r"^RaggedReturns\.select\(step, budget\): kept"):
        chunked_logits(model, random_ids(model, 1, 12), EvictionCache(model.config, policy), chunk=12)


# --- fuzzed: accepted exactly when a plain-Python reading of the contract accepts ---------------------------
def valid(rows: list[list[list[int]]], batch: int, heads: int, stored: int, budget: int) -> bool:
    return (
        len(rows) == batch
        and all(len(row) in (1, heads) for row in rows)
        and all(
            len(head) <= budget
            and all(0 <= i < stored for i in head)
            and all(a < b for a, b in itertools.pairwise(head))
            for row in rows
            for head in row
        )
    )


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_selected_indices_accepts_exactly_the_valid_selections(data):
    batch, heads, stored = data.draw(st.integers(1, 2)), 2, data.draw(st.integers(1, 6))
    budget = data.draw(st.integers(1, 5))
    shape = (data.draw(st.integers(1, 2)), data.draw(st.sampled_from([1, 2, 3])), data.draw(st.integers(0, 6)))
    flat = data.draw(st.lists(st.integers(-2, 7), min_size=shape[0] * shape[1] * shape[2]))
    flat = flat[: shape[0] * shape[1] * shape[2]]
    indices = torch.tensor(flat, dtype=torch.long).view(shape)
    if data.draw(st.booleans()):  # ascending rows more often, so that valid ones are drawn too
        indices = indices.sort(-1).values
    step = Step(
        None, 1, 1, stored, torch.ones(batch, heads, stored, dtype=torch.bool), None, {}, {}, lambda: None, None
    )
    policy = Returns(budget=budget, make=lambda s, b: indices)
    if valid(indices.tolist(), batch, heads, stored, budget):
        assert torch.equal(selected_indices(policy, step, budget), indices)
    else:
        with pytest.raises(PolicyOutputError, match=r"^Returns\.select\(step, budget\): .*accepted: "):
            selected_indices(policy, step, budget)
