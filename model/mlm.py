"""MLM training module: encoder + head, with the head run only on masked positions.

HF's `BertForMaskedLM(labels=...)` projects every position to the vocabulary ([B, L, V] logits) and then
ignores ~85% of them. Selecting the masked rows first ([M, H] -> [M, V], M ~ 0.15 B L) gives the same
loss with a fraction of the head's FLOPs and memory. Works for heads named `cls` (BERT family) and
`lm_head` (RoBERTa family); other models fall back to their own dense loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _head(model: nn.Module):
    for name in ("cls", "lm_head"):
        head = getattr(model, name, None)
        if isinstance(head, nn.Module):
            return head
    return None


class MaskedLM(nn.Module):
    """forward(input_ids, labels | (mlm_rows, mlm_targets), attention_mask=None) -> mean cross-entropy over
    the labelled positions.

    mlm_rows (int64[M]) are flat indices into [B*L] of the masked positions and mlm_targets (int64[M]) their
    labels, both computed by the dataloader on the CPU: with them the GPU never waits for a `nonzero`
    (a host sync per step). M may be padded with target -100 rows (ignored) to keep shapes steady."""

    def __init__(self, hf_model: nn.Module, sparse_head: bool = True):
        super().__init__()
        self.hf = hf_model
        self.sparse = sparse_head and _head(hf_model) is not None

    def forward(self, input_ids, labels=None, attention_mask=None, token_type_ids=None, mlm_rows=None,
                mlm_targets=None):
        if not self.sparse:
            return self.hf(input_ids=input_ids, attention_mask=attention_mask,
                           token_type_ids=token_type_ids, labels=labels).loss
        hidden = self.hf.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                    token_type_ids=token_type_ids).last_hidden_state  # [B, L, H]
        if mlm_rows is None:  # labels given as a dense [B, L] tensor: find the masked rows here
            flat = labels.reshape(-1)  # [B*L]
            mlm_rows = torch.nonzero(flat != -100).squeeze(1)  # [M]
            mlm_targets = flat.index_select(0, mlm_rows)
        logits = _head(self.hf)(hidden.reshape(-1, hidden.shape[-1]).index_select(0, mlm_rows))  # [M, V]
        loss_sum = F.cross_entropy(logits.float(), mlm_targets, reduction="sum", ignore_index=-100)
        count = (mlm_targets != -100).sum()
        return loss_sum / count.clamp(min=1)  # 0 (not NaN) for a batch with nothing masked
