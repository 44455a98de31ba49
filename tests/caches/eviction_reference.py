"""The definition of correctness for eviction caches: a dense run on exactly the kept tokens."""

import torch


@torch.no_grad()
def dense_on_kept(model, ids: torch.Tensor, kept: list[int], queries: list[int], first_label: int, mask=None):
    """Logits of `queries` when the model attends densely to `kept` tokens (in order) plus the queries.

    Kept token k is placed at position `first_label + k`; queries follow at their own indices.
    `mask` (2D, over ids) marks padding; kept padding tokens are masked in the dense run too.
    """
    order = kept + queries
    positions = [first_label + k for k in range(len(kept))] + queries
    sub_ids = ids[:, order]
    position_ids = torch.tensor([positions]).expand(ids.shape[0], -1)
    sub_mask = None if mask is None else mask[:, order]
    logits = model(sub_ids, position_ids=position_ids, attention_mask=sub_mask).logits
    return logits[:, len(kept) :]
