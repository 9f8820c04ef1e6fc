"""Packed sequences, attended one by one: documents inside packed pretraining blocks (data.isolate_documents)
and the examples of a pad-free fine-tuning batch (task.unpad, ModernBERT).

Two ways, both through transformers' own model classes and weights:
- the mask way (`isolated_inputs` on the CPU): the blocks stay [B, L]; a block-diagonal attention mask (ANDed
  with the local window in ModernBERT's sliding-window layers) keeps each document to itself, and the position
  ids restart at each document (RoPE positions, or learned absolute ones);
- the varlen way (`isolated_inputs` on a GPU, and `task.unpad`): the tokens go in as one [1, T] row with the
  sequence boundaries (`cu_seq_lens_*`, as transformers' FlashAttention path names them); the attention
  function registered here as `bertlaunch` runs PyTorch's variable-length FlashAttention on CUDA
  (torch.nn.attention.varlen, local windows included), so no pad and no pair across two sequences is computed.
  Elsewhere (CPU, or attention dropout in training, which that kernel lacks) it pads each sequence inside the
  attention only, as ModernBERT's own code did without FlashAttention. Without boundaries it is transformers'
  SDPA attention, unchanged, so a model set to it also runs ordinary padded batches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

VARLEN = "bertlaunch"  # the attention implementation name registered with transformers

try:
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # torch builds without it: the padded fallback below
    varlen_attn = None

# model type -> how its positions restart at a document: "rope" / "absolute" (position_ids 0..n-1), or
# "offset" (RoBERTa's learned positions start after padding_idx). Other types cannot isolate documents.
ISOLATING = {"modernbert": "rope", "bert": "absolute", "electra": "absolute", "roberta": "offset",
             "xlm-roberta": "offset"}


def check_isolation(config) -> None:
    """ValueError (naming the key and the fix) unless the model can attend and count positions per document."""
    kind = getattr(config, "model_type", "?")
    if kind not in ISOLATING:
        raise ValueError(f"data.isolate_documents=true: a {kind} model cannot take per-document positions and "
                         f"attention masks here (supported: {', '.join(sorted(ISOLATING))}); set "
                         "data.isolate_documents=false")
    if getattr(config, "_attn_implementation", "sdpa") not in ("sdpa", VARLEN):
        raise ValueError("data.isolate_documents=true needs model.attn_implementation=sdpa (it builds its own "
                         "attention masks)")


def varlen_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                     sliding_window: int | None = None, cu_seq_lens_q=None, max_length_q=None, **kwargs):
    """transformers' attention-function contract: query/key/value [1, H, T, D] -> ([1, T, H, D], None). With
    cu_seq_lens_q (int[N + 1]) and max_length_q (the longest sequence, a host int) each of the N sequences
    attends only to itself; `sliding_window` (ModernBERT's local layers pass its half-window + 1) limits the
    distance |i - j| to sliding_window - 1, as its FlashAttention path does."""
    if cu_seq_lens_q is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    half = sliding_window - 1 if sliding_window else -1
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # [T, H, D]
    cu = cu_seq_lens_q.to(torch.int32)
    if query.is_cuda and varlen_attn is not None and dropout == 0.0:
        out = varlen_attn(q, k, v, cu, cu, max_length_q, max_length_q, scale=scaling, window_size=(half, half))
        return out[None], None
    return per_sequence_sdpa(q, k, v, cu.long(), max_length_q, half, dropout, scaling)[None], None


def per_sequence_sdpa(q, k, v, cu, longest: int, half: int, dropout: float, scaling):
    """q, k, v [T, H, D] of N sequences -> [T, H, D]: each sequence padded to `longest` inside the attention
    only, pads masked out as keys (a pad query attends to everything, so no row is empty; it is dropped)."""
    t, heads, dim = q.shape
    n = cu.numel() - 1
    lens = cu[1:] - cu[:-1]
    seq = torch.repeat_interleave(torch.arange(n, device=q.device), lens, output_size=t)
    slot = seq * longest + torch.arange(t, device=q.device) - cu[seq]  # [T] -> its place in [N * longest]

    def padded(x):
        return x.new_zeros(n * longest, heads, dim).index_copy(0, slot, x).view(n, longest, heads, dim).transpose(1, 2)

    pos = torch.arange(longest, device=q.device)
    real = pos[None, :] < lens[:, None]  # [N, longest]
    allowed = real[:, None, :] | ~real[:, :, None]  # [N, query, key]: real keys; pad queries see all
    if half >= 0:
        allowed = allowed & (((pos[:, None] - pos[None, :]).abs() <= half)[None] | ~real[:, :, None])
    out = F.scaled_dot_product_attention(padded(q), padded(k), padded(v), attn_mask=allowed[:, None],
                                         dropout_p=dropout, scale=scaling)  # [N, H, longest, D]
    return out.transpose(1, 2).reshape(n * longest, heads, dim).index_select(0, slot)


AttentionInterface.register(VARLEN, varlen_attention)
AttentionMaskInterface.register(VARLEN, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def use_varlen(hf_model) -> None:
    """Route the model's attention through `varlen_attention` (plain SDPA for batches without boundaries)."""
    hf_model.set_attn_implementation(VARLEN)


def documents(doc_starts: torch.Tensor, rows: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """doc_starts int64[D] (flat indices into rows x length, ascending, every row's 0 included) ->
    (segment id int64[rows, length], position in its document int64[rows, length]), on the device."""
    flags = torch.zeros(rows * length, dtype=torch.long, device=doc_starts.device).index_fill_(0, doc_starts, 1)
    seg = flags.cumsum(0) - 1
    pos = torch.arange(rows * length, device=doc_starts.device) - doc_starts.index_select(0, seg)
    return seg.view(rows, length), pos.view(rows, length)


def isolated_inputs(hf_model, input_ids: torch.Tensor, doc_starts: torch.Tensor, max_doc_len: int,
                    varlen: bool | None = None) -> dict:
    """The base model's keyword arguments for [B, L] packed blocks whose documents attend only to themselves,
    positions restarting at each. varlen (default: on CUDA, with the varlen attention set): one [1, B*L] row +
    boundaries; else a block-diagonal mask. The hidden states come out [B, L, H] or [1, B*L, H]: the same rows
    when flattened."""
    config = hf_model.config
    rows, length = input_ids.shape
    seg, pos = documents(doc_starts, rows, length)
    if ISOLATING.get(config.model_type) == "offset":
        pos = pos + config.pad_token_id + 1
    modern = config.model_type == "modernbert"
    if varlen is None:
        varlen = input_ids.is_cuda and config._attn_implementation == VARLEN
    if varlen:
        cu = torch.cat([doc_starts, doc_starts.new_tensor([rows * length])])
        return {"input_ids": input_ids.view(1, -1), "position_ids": pos.view(1, -1),
                "attention_mask": {"full_attention": None, "sliding_attention": None} if modern else None,
                "cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": max_doc_len, "max_length_k": max_doc_len}
    same = (seg[:, :, None] == seg[:, None, :])[:, None]  # [B, 1, L, L]
    if modern:
        idx = torch.arange(length, device=input_ids.device)
        near = (idx[:, None] - idx[None, :]).abs() <= config.sliding_window
        mask = {"full_attention": same, "sliding_attention": same & near}
    else:
        mask = same
    return {"input_ids": input_ids, "position_ids": pos, "attention_mask": mask}
