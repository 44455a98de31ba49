"""`ChatSession`: a conversation reusing one cache equals answering every turn from scratch."""

import pytest
import torch
from conftest import byte_tokenizer, make_tiny_model
from transformers import DynamicCache, pipeline

from hf_kvcache import CACHE_KWARG, build_cache
from hf_kvcache.chat import ChatSession

# A template that rewrites earlier turns: the newest assistant turn is closed with "</s>", which the reply's
# own tokens do not end with, so the cache must be cropped back before the next turn.
TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
QUESTIONS = ["hello there, who are you?", "and what do you do all day?", "tell me more about that"]


@pytest.fixture(scope="module")
def chat():
    tokenizer = byte_tokenizer(TEMPLATE)
    tokenizer.eos_token = "!"
    return make_tiny_model("llama"), tokenizer


def fresh_reply(model, tokenizer, messages, spec: str) -> str:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    ids = ids["input_ids"]
    cache = build_cache(spec, model.config)
    output = model.generate(ids, **{CACHE_KWARG: cache}, max_new_tokens=8, do_sample=False)
    return tokenizer.decode(output[0, ids.shape[1] :], skip_special_tokens=True)


@pytest.mark.parametrize("spec", ["dynamic", "window:window=512", "sink:sink_tokens=4,window=512"])
def test_reused_turns_equal_fresh_ones(chat, spec):
    model, tokenizer = chat
    session = ChatSession(model, tokenizer, lambda: build_cache(spec, model.config))
    messages = []
    for question in QUESTIONS:
        messages.append({"role": "user", "content": question})
        reply = session.reply(messages, max_new_tokens=8)
        assert reply == fresh_reply(model, tokenizer, messages, spec)
        messages.append({"role": "assistant", "content": reply})
    assert session.reused_tokens > 50 and session.fresh_caches == 0  # earlier turns came from the cache
    assert session.seen == session.seen[: session.cache.get_seq_length()]


def test_a_cache_that_evicted_what_must_be_cropped_starts_again(chat):
    model, tokenizer = chat
    session = ChatSession(model, tokenizer, lambda: build_cache("window:window=16", model.config))
    messages = [{"role": "user", "content": QUESTIONS[0]}]
    first = session.reply(messages, max_new_tokens=8)
    messages += [{"role": "assistant", "content": first}, {"role": "user", "content": QUESTIONS[1]}]
    assert session.reply(messages, max_new_tokens=8) == fresh_reply(model, tokenizer, messages, "window:window=16")
    assert session.fresh_caches == 1  # never an answer from tokens the cache had already dropped


def test_refusals(chat):
    model, tokenizer = chat
    with pytest.raises(ValueError, match="no chat_template"):
        ChatSession(model, byte_tokenizer(), DynamicCache)
    with pytest.raises(ValueError, match=r"messages=\[\]"):
        ChatSession(model, tokenizer, DynamicCache).reply([])


def test_a_pipeline_takes_a_cache_per_call(chat):
    model, tokenizer = chat
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    expected = generator("the cat sat on", max_new_tokens=8, do_sample=False)
    cache = build_cache("window:window=512", model.config)
    assert generator("the cat sat on", max_new_tokens=8, do_sample=False, **{CACHE_KWARG: cache}) == expected
    assert cache.get_seq_length() > len("the cat sat on")  # the call really ran through the cache
    quantized = build_cache("quantized:bits=2,residual_length=0,group_size=16", model.config)
    generator("the cat sat on " * 8, max_new_tokens=4, do_sample=False, **{CACHE_KWARG: quantized})
    assert torch.is_tensor(quantized.layers[0].body.key_codes)
