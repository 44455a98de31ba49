"""Multi-turn chat that reuses one cache across turns.

Each turn, the whole conversation goes through the tokenizer's chat template; `generate` then feeds only the
tokens the cache has not seen. That is only right when the cache's tokens are exactly the start of the new
prompt, which a template does not promise (a reply decoded and templated again can tokenize differently,
and templates may rewrite earlier turns), and `generate` does not check it. `ChatSession` does: it keeps the
token ids its cache has seen, and before each turn crops the cache back to the prefix they share with the
new prompt, or, when the cache cannot give back what it evicted or quantized, starts a fresh one.
"""

from collections.abc import Callable

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.cache_utils import Cache

from hf_kvcache.compat import CACHE_KWARG
from hf_kvcache.devices import input_device


class ChatSession:
    """A conversation with `model` through caches made by `new_cache()` (e.g. `lambda: QuantizedCache(config)`).

    `reply(messages, **generate_kwargs)` answers the conversation so far (a list of `{"role", "content"}`
    messages, as `tokenizer.apply_chat_template` takes them) and returns the reply's text. Counters:
    `reused_tokens` (prompt tokens served from the cache over all turns), `fed_tokens` (prompt tokens the
    model computed) and `fresh_caches` (turns that had to start a new cache).

    Raises:
        ValueError: a tokenizer without a chat template, or an empty conversation.
    """

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, new_cache: Callable[[], Cache]):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("tokenizer has no chat_template; accepted: a tokenizer with one (tokenizer.chat_template)")
        self.model, self.tokenizer, self.new_cache = model, tokenizer, new_cache
        self.cache = new_cache()
        self.seen: list[int] = []  # the token ids self.cache has seen, in order
        self.reused_tokens = self.fed_tokens = self.fresh_caches = 0

    def _keep(self, prompt: list[int]) -> int:
        """Make the cache hold only the start of `prompt` it shares with what it has seen (leaving at least one
        token to feed); returns how many tokens it keeps."""
        shared = next(
            (i for i, (a, b) in enumerate(zip(self.seen, prompt)) if a != b), min(len(self.seen), len(prompt))
        )
        shared = min(shared, len(prompt) - 1)
        if shared < len(self.seen):
            try:
                self.cache.crop(shared - len(self.seen))  # a count to remove: transformers 5.25 takes no length
            except (ValueError, NotImplementedError, AttributeError):  # evicted tokens cannot come back
                self.cache, shared = self.new_cache(), 0
                self.fresh_caches += 1
            self.seen = self.seen[:shared]
        return shared

    @torch.no_grad()
    def reply(self, messages: list[dict], **generate_kwargs) -> str:
        """The model's reply to `messages` (greedy unless `generate_kwargs` say otherwise)."""
        if not messages:
            raise ValueError("messages=[] holds no turn; accepted: a list of {'role', 'content'} messages")
        prompt = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        prompt = list(prompt["input_ids"] if isinstance(prompt, dict) or hasattr(prompt, "keys") else prompt)
        kept = self._keep(prompt)
        self.reused_tokens += kept
        self.fed_tokens += len(prompt) - kept
        ids = torch.tensor([prompt], device=input_device(self.model))
        generate_kwargs.setdefault("do_sample", False)
        output = self.model.generate(
            ids, attention_mask=torch.ones_like(ids), **{CACHE_KWARG: self.cache}, **generate_kwargs
        )
        self.seen = output[0, : self.cache.get_seq_length()].tolist()
        return self.tokenizer.decode(output[0, ids.shape[1] :], skip_special_tokens=True)
