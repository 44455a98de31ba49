"""Every policy constructor accepts exactly the values its docstring allows, refusing the rest by name (fuzzed).
Bounded fields (ExpectedAttention's n_future_positions and query_window, SnapKV's kernel_size) included."""

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from hf_kvcache.policies import H2O, TOVA, AdaKV, ExpectedAttention, KVzip, PyramidKV, SnapKV, StreamingLLM
from hf_kvcache.policies.expected_attention import MAX_FUTURE_POSITIONS, MAX_QUERY_WINDOW
from hf_kvcache.policies.snapkv import MAX_KERNEL_SIZE


def integer(low: int, high: int | None = None):
    def accepts(value: object) -> bool:
        plain = isinstance(value, int) and not isinstance(value, bool)
        return plain and value >= low and (high is None or value <= high)

    return accepts


def boolean(value: object) -> bool:
    return isinstance(value, bool)


def odd_kernel(value: object) -> bool:
    return integer(1, MAX_KERNEL_SIZE)(value) and value % 2 == 1


BUDGET = 64  # every case below is built with this budget and otherwise default fields
CASES = {
    ExpectedAttention: {
        "n_future_positions": integer(1, MAX_FUTURE_POSITIONS),
        "query_window": integer(1, MAX_QUERY_WINDOW),
        "recent": integer(0, BUDGET - 4),  # with the default sink_tokens=4
        "sink_tokens": integer(0, BUDGET - 4),
        "per_head": boolean,
    },
    SnapKV: {"kernel_size": odd_kernel, "observation_window": integer(1, BUDGET), "per_head": boolean},
    PyramidKV: {"beta": integer(1), "kernel_size": odd_kernel},
    AdaKV: {"kernel_size": odd_kernel, "observation_window": integer(1, BUDGET)},
    H2O: {"recent": lambda v: v is None or integer(0, BUDGET)(v), "per_head": boolean},
    TOVA: {"budget": integer(1), "per_head": boolean},
    StreamingLLM: {"sink_tokens": integer(0, BUDGET)},
    KVzip: {"chunk_size": integer(1), "sink_tokens": integer(0, BUDGET)},
}
PARAMS = [(policy, name) for policy, fields in CASES.items() for name in fields]
VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 2 * MAX_FUTURE_POSITIONS),
    st.sampled_from([1, 3, MAX_KERNEL_SIZE, MAX_KERNEL_SIZE + 2, MAX_QUERY_WINDOW, MAX_QUERY_WINDOW + 1, 10**12]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=3),
)


@pytest.mark.parametrize(("policy", "name"), PARAMS, ids=[f"{p.__name__}-{n}" for p, n in PARAMS])
@settings(max_examples=40, deadline=None)
@given(value=VALUES)
@example(value=BUDGET - 3)  # within the budget alone, past it with the 4 default sinks (or recent tokens)
def test_policy_fields_are_accepted_exactly_when_valid(policy, name, value):
    kwargs = {"budget": BUDGET, name: value}
    if CASES[policy][name](value):
        expected = BUDGET // 2 if (policy, name, value) == (H2O, "recent", None) else value  # None: half the budget
        assert getattr(policy(**kwargs), name) == expected
    else:
        with pytest.raises(ValueError, match=rf"{name}="):
            policy(**kwargs)
