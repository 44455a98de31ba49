"""Everything of hf_kvcache that touches transformers' attention and mask functions.

- `routing`: the one registration with `AttentionInterface` / `AttentionMaskInterface`, the routes a layer's
  returned keys carry to the attention wrapper, the per-cache `ForwardContext` and the mask mailbox.
- `probabilities`: the model's own attention probabilities (masks, softcapping, learned sinks, scaling, GQA),
  shared by score capture, KVzip's reconstruction scores and code-reading decode.

This package imports nothing else of hf_kvcache: caches, score capture and code-reading decode build on it.
"""
