"""Pad-free (varlen) forward of a BERT-architecture sequence classifier: pad tokens cost nothing.

A fine-tuning micro-batch of B sequences of lengths n_1..n_B is given packed end to end: T = sum(n_i)
tokens, with offsets int64[B + 1] (sequence i is tokens offsets[i]:offsets[i+1]) computed by the collate on
the CPU, so the GPU never waits for a `nonzero`. Embeddings, the feed-forward blocks, every LayerNorm and
the residuals act per token on [T, H]; only attention needs the sequence boundaries, and gets them as a
jagged nested tensor, which PyTorch's scaled_dot_product_attention runs per sequence (FlashAttention or
memory-efficient kernels on GPUs, the math kernel on the CPU). The padded path computes B * max(n_i)
positions instead of T.

The Hugging Face modules and weights are used as they are (embeddings, query/key/value, the attention
output block, the intermediate and output blocks, pooler, classifier): a checkpoint is the same in both
paths, and so are the results, up to floating-point summation order.

ModernBERT runs its own unpadded path: its model class takes the packed tokens as one [1, T] row with the
sequence boundaries, and its attention goes through model/packed.py (variable-length FlashAttention with its
local windows on GPUs; each sequence padded inside the attention only, elsewhere).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertForSequenceClassification, ModernBertForSequenceClassification

from bertlaunch.model.packed import use_varlen

# raised from inside torch's jagged-layout SDPA on the CPU, which is the layout it recommends: noise in run logs
warnings.filterwarnings("ignore", message="The PyTorch API of nested tensors is in prototype stage")


def check_unpadded(hf_model: nn.Module, compile_: bool = False) -> None:
    """ValueError (naming the key and the fix) unless `hf_model` can run pad-free (with model.compile=`compile_`);
    a ModernBERT is set to the varlen attention here."""
    cfg, why = hf_model.config, None
    if isinstance(hf_model, ModernBertForSequenceClassification):
        use_varlen(hf_model)
        return
    if not isinstance(hf_model, BertForSequenceClassification):
        why = (f"the model is a {type(hf_model).__name__}, not a BertForSequenceClassification (BERT, MiniLM, ...) "
               "or a ModernBertForSequenceClassification")
    elif getattr(cfg, "position_embedding_type", "absolute") != "absolute":
        why = f"the model has position_embedding_type={cfg.position_embedding_type} (only absolute positions)"
    if why:
        raise ValueError(f"task.unpad=true: {why}; set task.unpad=false for the padded path")
    if compile_:  # classify_packed calls BERT's layers itself, never the compiled encoder
        raise ValueError("task.unpad=true with model.compile=true: the pad-free BERT path runs the layers itself, so "
                         "nothing would be compiled; set model.compile=false (or task.unpad=false)")


def attention(layer: nn.Module, h: torch.Tensor, offsets: torch.Tensor, max_len: int) -> torch.Tensor:
    """One BERT self-attention block over packed tokens: h [T, H] -> [T, H] (before the output block)."""
    att = layer.attention.self
    t, heads, dim = h.shape[0], att.num_attention_heads, att.attention_head_size

    def jagged(x: torch.Tensor) -> torch.Tensor:  # [T, heads*dim] -> nested [B, heads, n_i, dim]
        return torch.nested.nested_tensor_from_jagged(x.view(t, heads, dim), offsets, max_seqlen=max_len
                                                      ).transpose(1, 2)

    ctx = F.scaled_dot_product_attention(jagged(att.query(h)), jagged(att.key(h)), jagged(att.value(h)),
                                         dropout_p=att.dropout.p if att.training else 0.0)
    return ctx.transpose(1, 2).values().reshape(t, heads * dim)  # [T, heads*dim]


def classify_packed(hf_model: nn.Module, input_ids: torch.Tensor, token_type_ids: torch.Tensor,
                    position_ids: torch.Tensor, offsets: torch.Tensor, max_len: int) -> torch.Tensor:
    """Logits [B, C] from packed int64[T] ids / token types / positions (0..n_i-1 within each sequence)."""
    if isinstance(hf_model, ModernBertForSequenceClassification):
        return modernbert_packed(hf_model, input_ids, position_ids, offsets, max_len)
    bert = hf_model.bert
    h = bert.embeddings(input_ids=input_ids[None], token_type_ids=token_type_ids[None],
                        position_ids=position_ids[None])[0]  # [T, H]
    for layer in bert.encoder.layer:
        a = layer.attention.output(attention(layer, h, offsets, max_len), h)  # dense, dropout, LayerNorm(+h)
        h = layer.output(layer.intermediate(a), a)  # [T, H]
    first = h.index_select(0, offsets[:-1])  # [B, H]: each sequence's [CLS]
    pooled = bert.pooler(first[:, None, :]) if bert.pooler is not None else first
    return hf_model.classifier(hf_model.dropout(pooled))


def modernbert_packed(hf_model: nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor,
                      offsets: torch.Tensor, max_len: int) -> torch.Tensor:
    """ModernBertForSequenceClassification's forward on packed sequences: the same modules, pooling ("cls": each
    sequence's first token, "mean": its mean), head, dropout and classifier."""
    h = hf_model.model(input_ids=input_ids[None], position_ids=position_ids[None],
                       attention_mask={"full_attention": None, "sliding_attention": None},
                       cu_seq_lens_q=offsets, cu_seq_lens_k=offsets, max_length_q=max_len,
                       max_length_k=max_len).last_hidden_state[0]  # [T, H]
    if hf_model.config.classifier_pooling == "cls":
        pooled = h.index_select(0, offsets[:-1])
    else:
        lens = offsets[1:] - offsets[:-1]
        seq = torch.repeat_interleave(torch.arange(lens.numel(), device=h.device), lens, output_size=h.shape[0])
        pooled = h.new_zeros(lens.numel(), h.shape[1]).index_add(0, seq, h) / lens[:, None].to(h.dtype)
    return hf_model.classifier(hf_model.drop(hf_model.head(pooled)))
