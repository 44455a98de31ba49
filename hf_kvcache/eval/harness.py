"""lm-evaluation-harness (https://github.com/EleutherAI/lm-evaluation-harness) with a hf_kvcache cache.

`CacheLM` is the harness's own `hf` model (`HFLM`: its tokenization, request ordering, batching, padding,
chat templates and output format) with two changes: every scoring forward runs through a fresh cache built
from a cache spec, fed `chunk_size` tokens at a time (as `hf-kvcache eval`'s perplexity mode does, so
quantization and eviction really change the scores of loglikelihood and rolling-loglikelihood requests),
and every `generate` call gets a fresh cache. Importing this module registers it as the harness model type
`hf-kvcache`:

    lm_eval.simple_evaluate(model="hf-kvcache", model_args="cache=quantized,bits=2", tasks=["..."])
    hf-kvcache lm-eval --cache quantized:bits=2 --tasks ...   # the harness's `run` options after --cache

The harness splits `model_args` at commas, so a spec's settings are separate model arguments
(`cache=quantized,bits=2,group_size=32`); a one-setting spec also reads as `cache=quantized:bits=2`.

With `cache=dynamic` the scores equal the `hf` model's (up to float rounding of the chunked forwards):
tested on a local task in `tests/eval/test_harness.py`.
"""

import inspect

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from transformers import PreTrainedModel

from hf_kvcache.caches.compress_once import compresses_once
from hf_kvcache.compat import CACHE_KWARG
from hf_kvcache.eval.perplexity import feed_in_steps
from hf_kvcache.registry import CacheSpec, build_cache, parse_cache_spec
from hf_kvcache.scoring import score_capture
from hf_kvcache.validation import check_int

MODEL_TYPE = "hf-kvcache"
DEFAULT_CHUNK_SIZE = 512  # tokens per scoring forward: the perplexity mode's default step
_HFLM_PARAMETERS = set(inspect.signature(HFLM.__init__).parameters) - {"self", "kwargs"}


def cache_spec(cache: str | CacheSpec, settings: dict[str, object]) -> CacheSpec:
    """The spec of `cache` (a spec or its text) with `settings` (separate model arguments) added.

    Raises:
        ValueError: an unknown cache or setting, a setting given twice, or a value out of range.
    """
    if isinstance(cache, CacheSpec):
        text = cache.label
    elif isinstance(cache, str):
        text = cache
    else:
        raise ValueError(f"cache={cache!r} must be a cache spec such as 'quantized' or 'quantized:bits=2'")
    extra = ",".join(f"{key}={value}" for key, value in settings.items())
    if extra:
        text = f"{text}{',' if ':' in text else ':'}{extra}"
    return parse_cache_spec(text)


@register_model(MODEL_TYPE)
class CacheLM(HFLM):
    """The harness's `hf` model with every forward through a cache built from `cache` (see the module).

    Args:
        pretrained: a model, or a hub id or folder (loaded by `hf_kvcache.models.load_model`, float32
            unless `dtype` says otherwise), or a packaged model's name ("gemma3-270m"); "packaged" or None
            is the packaged SmolLM2-135M-Instruct.
        cache: a cache spec (`hf-kvcache eval --help` lists them); its settings may also come as further
            keyword arguments (`bits=2`), since the harness splits `model_args` at commas.
        chunk_size: tokens per scoring forward through the cache.
        **kwargs: the harness's `HFLM` arguments (`batch_size`, `max_length`, ...), then cache settings.

    Raises:
        ValueError: a bad spec, setting or `chunk_size`.
    """

    def __init__(
        self,
        pretrained: str | PreTrainedModel | None = "packaged",
        cache: str | CacheSpec = "dynamic",
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        **kwargs,
    ) -> None:
        harness = {key: value for key, value in kwargs.items() if key in _HFLM_PARAMETERS}
        self.cache_spec = cache_spec(cache, {key: value for key, value in kwargs.items() if key not in harness})
        check_int("chunk_size", chunk_size, minimum=1, hint="tokens per scoring forward")
        self.chunk_size = chunk_size
        if pretrained is None or isinstance(pretrained, str):
            from hf_kvcache.models import load_model

            name = None if pretrained in (None, "packaged") else pretrained
            pretrained, tokenizer = load_model(name, dtype=harness.pop("dtype", None))
            harness.setdefault("tokenizer", tokenizer)
        super().__init__(pretrained=pretrained, **harness)
        self.new_cache()  # a value out of range is refused now, not at the first request

    def new_cache(self):
        """A fresh cache of the spec for this model."""
        return build_cache(self.cache_spec, self.model.config)

    def _model_call(self, inps: torch.Tensor, attn_mask=None, labels=None) -> torch.Tensor:
        """Logits (batch, length, vocab) of the right-padded `inps`, fed through a fresh cache in chunks (the
        padding comes after every real token of its row, so it changes none of their logits)."""
        if attn_mask is not None or labels is not None:
            raise ValueError(f"the {MODEL_TYPE} model type serves decoder-only models; use the harness's `hf`")
        cache = self.new_cache()
        with torch.no_grad(), score_capture(self.model, getattr(cache, "needs_score_capture", False)):
            steps = feed_in_steps(self.model, inps, cache, self.chunk_size, self.tokenizer)
            return torch.cat([logits for _, logits, _ in steps], dim=1)

    def _model_generate(self, context: torch.Tensor, max_length: int, stop: list[str], **generation_kwargs):
        """The harness's generation with a fresh cache; a compress-once cache compresses the context (all
        but its last token) first, by its protocol."""
        cache = self.new_cache()
        with torch.no_grad(), score_capture(self.model, getattr(cache, "needs_score_capture", False)):
            if compresses_once(cache):
                mask = generation_kwargs.get("attention_mask")
                cache.compress_context(
                    self.model,
                    context[:, :-1],
                    attention_mask=None if mask is None else mask[:, :-1],
                    tokenizer=self.tokenizer,
                )
            return super()._model_generate(context, max_length, stop, **{CACHE_KWARG: cache}, **generation_kwargs)

    def get_model_info(self) -> dict:
        """The harness's model record, with the cache spec and chunk size."""
        return {**super().get_model_info(), "cache": self.cache_spec.label, "chunk_size": self.chunk_size}
