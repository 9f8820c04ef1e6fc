"""MLM training module: encoder + head, with the head run only on masked positions.

HF's `BertForMaskedLM(labels=...)` projects every position to the vocabulary ([B, L, V] logits) and then
ignores ~85% of them. Selecting the masked rows first ([M, H] -> [M, V], M ~ 0.15 B L) gives the same
loss with a fraction of the head's FLOPs and memory. `sparse_head` knows the head of each family
transformers ships (`mlm_head`: BERT `cls`, RoBERTa `lm_head`, ModernBERT `head` + `decoder`, ELECTRA's generator head,
DeBERTa-v2, DistilBERT); any other masked-LM model falls back to its own dense loss, given dense labels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bertlaunch.model.packed import isolated_inputs


def mlm_head(model: nn.Module):
    """hidden [M, H] -> logits [M, V], the model's own MLM head modules as its forward applies them; or None."""
    for name in ("cls", "lm_head"):  # BERT family; RoBERTa family
        head = getattr(model, name, None)
        if isinstance(head, nn.Module):
            return head
    parts = {name: getattr(model, name, None) for name in ("head", "decoder", "generator_predictions",
                                                           "generator_lm_head", "lm_predictions", "vocab_transform")}
    if parts["head"] is not None and parts["decoder"] is not None:  # ModernBERT
        return lambda h: model.decoder(model.head(h))
    if parts["generator_predictions"] is not None and parts["generator_lm_head"] is not None:  # ELECTRA
        return lambda h: model.generator_lm_head(model.generator_predictions(h))
    if parts["lm_predictions"] is not None:  # DeBERTa-v2 / v3 (non-legacy head: ties to the word embeddings)
        return lambda h: model.lm_predictions(h, model.deberta.embeddings.word_embeddings)
    if parts["vocab_transform"] is not None:  # DistilBERT
        return lambda h: model.vocab_projector(model.vocab_layer_norm(model.activation(model.vocab_transform(h))))
    return None


class MaskedLM(nn.Module):
    """forward(input_ids, labels | (mlm_rows, mlm_targets), attention_mask=None) -> mean cross-entropy over
    the labelled positions.

    mlm_rows (int64[M]) are flat indices into [B*L] of the masked positions and mlm_targets (int64[M]) their
    labels, both computed by the dataloader on the CPU: with them the GPU never waits for a `nonzero`
    (a host sync per step). M may be padded with target -100 rows (ignored) to keep shapes steady.
    doc_starts (int64[D], flat indices into [B*L]) + max_doc_len: each document of a packed block attends only
    to itself, its positions restarting at 0 (data.isolate_documents; model/packed.py)."""

    def __init__(self, hf_model: nn.Module, sparse_head: bool = True):
        super().__init__()
        self.hf = hf_model
        self.sparse = sparse_head and mlm_head(hf_model) is not None

    def forward(self, input_ids, labels=None, attention_mask=None, token_type_ids=None, mlm_rows=None,
                mlm_targets=None, doc_starts=None, max_doc_len: int = 0):
        if doc_starts is not None:
            inputs = isolated_inputs(self.hf, input_ids, doc_starts, max_doc_len)
        else:
            inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            inputs["token_type_ids"] = token_type_ids
        if not self.sparse:
            if labels is None:  # sparse labels from the dataloader -> dense [B*L], -100 where nothing is masked
                labels = torch.full((input_ids.numel(),), -100, dtype=torch.long, device=input_ids.device)
                labels = labels.scatter_reduce(0, mlm_rows, mlm_targets, "amax")  # pad rows (-100) never win
            return self.hf(**inputs, labels=labels.view(inputs["input_ids"].shape)).loss
        hidden = self.hf.base_model(**inputs).last_hidden_state  # [B, L, H] (or [1, B*L, H]: the same rows)
        if mlm_rows is None:  # labels given as a dense [B, L] tensor: find the masked rows here
            flat = labels.reshape(-1)  # [B*L]
            mlm_rows = torch.nonzero(flat != -100).squeeze(1)  # [M]
            mlm_targets = flat.index_select(0, mlm_rows)
        logits = mlm_head(self.hf)(hidden.reshape(-1, hidden.shape[-1]).index_select(0, mlm_rows))  # [M, V]
        loss_sum = F.cross_entropy(logits.float(), mlm_targets, reduction="sum", ignore_index=-100)
        count = (mlm_targets != -100).sum()
        return loss_sum / count.clamp(min=1)  # 0 (not NaN) for a batch with nothing masked
