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

Sentence embeddings (model/embed.py) run the same BERT layer loop with the attention in length groups instead
(grouped_attention): the texts are packed sorted by length, and each group of similar lengths is padded to its own
longest inside the attention only. On the CPU that is faster than the nested tensors, whose SDPA runs text by text.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertForSequenceClassification, BertModel, ModernBertForSequenceClassification

from bertlaunch.model.packed import use_varlen

# raised from inside torch's jagged-layout SDPA on the CPU, which is the layout it recommends: noise in run logs
warnings.filterwarnings("ignore", message="The PyTorch API of nested tensors is in prototype stage")


def check_unpadded(hf_model: nn.Module, compile_: bool = False) -> None:
    """ValueError (naming the key and the fix) unless `hf_model` can run pad-free (with model.compile=`compile_`);
    a ModernBERT is set to the varlen attention here."""
    if isinstance(hf_model, ModernBertForSequenceClassification):
        use_varlen(hf_model)
        return
    if not isinstance(hf_model, BertForSequenceClassification):
        why = (f"the model is a {type(hf_model).__name__}, not a BertForSequenceClassification (BERT, MiniLM, ...) "
               "or a ModernBertForSequenceClassification")
    else:
        why = packed_problem(hf_model.bert)
    if why:
        raise ValueError(f"task.unpad=true: {why}; set task.unpad=false for the padded path")
    if compile_:  # classify_packed calls BERT's layers itself, never the compiled encoder
        raise ValueError("task.unpad=true with model.compile=true: the pad-free BERT path runs the layers itself, so "
                         "nothing would be compiled; set model.compile=false (or task.unpad=false)")


def packed_problem(hf_model: nn.Module) -> str | None:
    """Why the base encoder `hf_model` cannot run packed (bert_packed), or None: a BertModel (BERT, MiniLM) with
    absolute positions can."""
    if not isinstance(hf_model, BertModel):
        return f"the model is a {type(hf_model).__name__}, not a BertModel (BERT, MiniLM, ...)"
    kind = getattr(hf_model.config, "position_embedding_type", "absolute")
    return None if kind == "absolute" else f"the model has position_embedding_type={kind} (only absolute positions)"


def attention(att: nn.Module, h: torch.Tensor, offsets: torch.Tensor, max_len: int) -> torch.Tensor:
    """One BERT self-attention (`att`: layer.attention.self) over packed tokens, per sequence (nested tensors):
    h [T, H] -> [T, H] (before the output block)."""
    t, heads, dim = h.shape[0], att.num_attention_heads, att.attention_head_size

    def jagged(x: torch.Tensor) -> torch.Tensor:  # [T, heads*dim] -> nested [B, heads, n_i, dim]
        return torch.nested.nested_tensor_from_jagged(x.view(t, heads, dim), offsets, max_seqlen=max_len
                                                      ).transpose(1, 2)

    ctx = F.scaled_dot_product_attention(jagged(att.query(h)), jagged(att.key(h)), jagged(att.value(h)),
                                         dropout_p=att.dropout.p if att.training else 0.0)
    return ctx.transpose(1, 2).values().reshape(t, heads * dim)  # [T, heads*dim]


def grouped_attention(att: nn.Module, h: torch.Tensor, groups: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
                      ) -> torch.Tensor:
    """One BERT self-attention over packed texts sorted by length, group by group: h [T, H] -> [T, H].

    Group g holds n_g texts of width at most L_g whose T_g tokens follow group g-1's in h; it is given as
    (index int64[n_g * L_g]: the row of h at each padded position, any row at a pad; mask bool[n_g, 1, 1, L_g]:
    True at the real keys; real int64[T_g]: the padded positions of the real tokens, in order). q, k and v are one
    product each over all T tokens; only the [n_g, heads, L_g, L_g] scores are per group. A pad's key is masked
    and its query's output dropped, so neither reaches a real token, forward or backward."""
    heads, dim = att.num_attention_heads, att.attention_head_size
    q, k, v = att.query(h), att.key(h), att.value(h)  # [T, heads*dim] each
    out = []
    for index, mask, real in groups:
        n, width = mask.shape[0], mask.shape[-1]
        qg, kg, vg = (x.index_select(0, index).view(n, width, heads, dim).transpose(1, 2)  # [n_g, heads, L_g, dim]
                      for x in (q, k, v))
        ctx = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=mask,
                                             dropout_p=att.dropout.p if att.training else 0.0)
        out.append(ctx.transpose(1, 2).reshape(n * width, heads * dim).index_select(0, real))  # [T_g, heads*dim]
    return torch.cat(out)


def bert_packed(bert: nn.Module, input_ids: torch.Tensor, token_type_ids: torch.Tensor, position_ids: torch.Tensor,
                attend) -> torch.Tensor:
    """A BertModel's last hidden states [T, H] of packed int64[T] ids / token types / positions; attend(att, h)
    runs one self-attention (`attention` or `grouped_attention`). Every other module acts per token."""
    h = bert.embeddings(input_ids=input_ids[None], token_type_ids=token_type_ids[None],
                        position_ids=position_ids[None])[0]  # [T, H]
    for layer in bert.encoder.layer:
        a = layer.attention.output(attend(layer.attention.self, h), h)  # dense, dropout, LayerNorm(+h)
        h = layer.output(layer.intermediate(a), a)  # [T, H]
    return h


def classify_packed(hf_model: nn.Module, input_ids: torch.Tensor, token_type_ids: torch.Tensor,
                    position_ids: torch.Tensor, offsets: torch.Tensor, max_len: int) -> torch.Tensor:
    """Logits [B, C] from packed int64[T] ids / token types / positions (0..n_i-1 within each sequence)."""
    if isinstance(hf_model, ModernBertForSequenceClassification):
        return modernbert_packed(hf_model, input_ids, position_ids, offsets, max_len)
    bert = hf_model.bert
    h = bert_packed(bert, input_ids, token_type_ids, position_ids,
                    lambda att, x: attention(att, x, offsets, max_len))  # [T, H]
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
    pooled = pool_packed(h, offsets, hf_model.config.classifier_pooling)
    return hf_model.classifier(hf_model.drop(hf_model.head(pooled)))


def pool_packed(h: torch.Tensor, offsets: torch.Tensor, pooling: str) -> torch.Tensor:
    """h [T, H] of N packed sequences (offsets int64[N + 1]) -> [N, H]: "cls" each sequence's first token, anything
    else the mean of its tokens."""
    if pooling == "cls":
        return h.index_select(0, offsets[:-1])
    lens = offsets[1:] - offsets[:-1]  # [N]
    seq = torch.repeat_interleave(torch.arange(lens.numel(), device=h.device), lens, output_size=h.shape[0])
    return h.new_zeros(lens.numel(), h.shape[1]).index_add(0, seq, h) / lens[:, None].to(h.dtype)
