"""Sequence classification / regression module for fine-tuning (AutoModelForSequenceClassification)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    BertForSequenceClassification,
    ModernBertForSequenceClassification,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING

from bertlaunch.model.build import attention_kernel, check_vocab, configure, pad_embeddings, padded_vocab, preset_config
from bertlaunch.model.presets import family
from bertlaunch.model.unpadded import classify_packed

MAPPING = MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING


def load_classifier(model_cfg, model_dir: str | None, num_labels: int, id2label: dict | None, regression: bool,
                    vocab_size: int, pad_id: int = 0, meta: bool = False):
    """A pretrained encoder from `model_dir` (or the preset model_cfg.preset, for tests) with a fresh
    classification head, initialised from the torch seed the caller set; meta=True: on the meta device."""
    labels = {"num_labels": num_labels, "problem_type": "regression" if regression else "single_label_classification"}
    if id2label:
        labels.update(id2label=id2label, label2id={v: k for k, v in id2label.items()})
    if model_cfg.preset:
        config = preset_config(model_cfg.preset, padded_vocab(vocab_size, model_cfg.pad_vocab_to_multiple_of), pad_id,
                               model_cfg.max_position_embeddings, model_cfg.attn_implementation)
        config.update(labels)
        configure(config, model_cfg)
        modern = family(model_cfg.preset) == "modernbert"
        with torch.device("meta" if meta else "cpu"):
            model = (ModernBertForSequenceClassification if modern else BertForSequenceClassification)(config)
    else:
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=model_cfg.trust_remote_code, **labels)
        configure(config, model_cfg)
        if meta:
            config.vocab_size = padded_vocab(config.vocab_size, model_cfg.pad_vocab_to_multiple_of)
            with torch.device("meta"):
                model = AutoModelForSequenceClassification.from_config(
                    config, attn_implementation=attention_kernel(config, model_cfg.attn_implementation, MAPPING),
                    trust_remote_code=model_cfg.trust_remote_code)
        else:
            model = AutoModelForSequenceClassification.from_pretrained(
                model_dir, config=config, attn_implementation=attention_kernel(config, model_cfg.attn_implementation,
                                                                               MAPPING),
                trust_remote_code=model_cfg.trust_remote_code, ignore_mismatched_sizes=True)
            pad_embeddings(model, model_cfg.pad_vocab_to_multiple_of)
        config = model.config
    check_vocab(model.get_input_embeddings().num_embeddings, vocab_size, model_dir or f"preset {model_cfg.preset}")
    return model, config


class Classifier(nn.Module):
    """forward(..., labels=None) -> logits [B, C]; with labels -> weight x summed loss over the batch.

    The trainer passes weight = (world x accum) / examples-in-this-step, so that DeepSpeed's mean over
    ranks and micro-batches gives the true mean over the step's examples, also for an uneven last batch."""

    def __init__(self, hf_model: nn.Module, regression: bool):
        super().__init__()
        self.hf, self.regression = hf_model, regression

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None, weight: float = 1.0,
                position_ids=None, offsets=None, max_len: int = 0):
        """Padded input_ids [B, W] + attention_mask; or packed (model/unpadded.py): input_ids, token_type_ids,
        position_ids int64[T], offsets int64[B + 1], max_len = the longest example."""
        if offsets is not None:
            logits = classify_packed(self.hf, input_ids, token_type_ids, position_ids, offsets, max_len)
        else:
            logits = self.hf(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).logits
        if labels is None:
            return logits
        if self.regression:
            loss = F.mse_loss(logits.squeeze(-1).float(), labels.float(), reduction="sum")
        else:
            loss = F.cross_entropy(logits.float(), labels, reduction="sum")
        return loss * weight
