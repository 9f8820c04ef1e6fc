"""Sentence embeddings: an encoder (transformers' AutoModel: BERT, MiniLM, ModernBERT, ...) with mean or [CLS]
pooling and optional L2 normalisation, and the sentence-transformers folder layout it is saved in and read from.

The pooling is sentence-transformers' own: mean = the average of the token vectors under the attention mask, cls =
the first token's vector; normalisation = F.normalize. So a folder written here and loaded with
`SentenceTransformer(path)` gives the embeddings this module computes (tests/test_embed_st.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, BertModel, ModernBertModel
from transformers.models.auto.modeling_auto import MODEL_MAPPING

from bertlaunch.model.build import attention_kernel, check_vocab, configure, pad_embeddings, padded_vocab, preset_config
from bertlaunch.model.presets import family
from bertlaunch.model.unpadded import bert_packed, grouped_attention, packed_problem, pool_packed

POOLINGS = ("mean", "cls")


def load_encoder(model_cfg, model_dir: str | None, vocab_size: int, pad_id: int = 0, meta: bool = False):
    """-> (transformers base model, its config): the folder `model_dir` (any Hugging Face encoder folder: a
    sentence-transformers model, a pretraining export, a classifier; heads are dropped) or the preset
    model_cfg.preset (weights from the torch seed the caller set); meta=True: on the meta device. A pooler layer,
    which sentence embeddings never use, is kept as it is (frozen) so that the saved folder has every weight."""
    if model_cfg.preset:
        config = preset_config(model_cfg.preset, padded_vocab(vocab_size, model_cfg.pad_vocab_to_multiple_of), pad_id,
                               model_cfg.max_position_embeddings, model_cfg.attn_implementation)
        configure(config, model_cfg)
        with torch.device("meta" if meta else "cpu"):
            model = (ModernBertModel if family(model_cfg.preset) == "modernbert" else BertModel)(config)
    else:
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=model_cfg.trust_remote_code)
        configure(config, model_cfg)
        kernel = attention_kernel(config, model_cfg.attn_implementation, MODEL_MAPPING)
        if meta:
            config.vocab_size = padded_vocab(config.vocab_size, model_cfg.pad_vocab_to_multiple_of)
            with torch.device("meta"):
                model = AutoModel.from_config(config, attn_implementation=kernel,
                                              trust_remote_code=model_cfg.trust_remote_code)
        else:
            model = AutoModel.from_pretrained(model_dir, config=config, attn_implementation=kernel,
                                              trust_remote_code=model_cfg.trust_remote_code)
            pad_embeddings(model, model_cfg.pad_vocab_to_multiple_of)
        config = model.config
    if getattr(model, "pooler", None) is not None:
        model.pooler.requires_grad_(False)
    check_vocab(model.get_input_embeddings().num_embeddings, vocab_size, model_dir or f"preset {model_cfg.preset}")
    return model, config


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """hidden float[B, L, H], mask int[B, L] -> float[B, H]: sentence-transformers' Pooling (mean: clamped at 1e-9)."""
    if pooling == "cls":
        return hidden[:, 0]
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


class Encoder(nn.Module):
    """forward(input_ids, attention_mask) -> float32[N, H] sentence embeddings, in one of three layouts:
    - int64[N, L] input_ids and attention_mask: every text padded to the longest;
    - lists of them: groups of texts, each padded to its own longest (data/tables/triples.py collate_rows), whose
      embeddings come out group after group;
    - packed (a BertModel only; `packed`=True checks that at construction, and says the training batches come
      so): input_ids int64[T], the N texts end to end, sorted by length,
      with position_ids int64[T] (0.. in each text), offsets int64[N + 1] (text i is tokens offsets[i]:offsets[i+1])
      and the attention's length groups (model/unpadded.py grouped_attention); no pad token reaches a linear layer.
    """

    def __init__(self, hf_model: nn.Module, pooling: str, normalize: bool, packed: bool = False):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling '{pooling}' is not one of: {', '.join(POOLINGS)}")
        why = packed_problem(hf_model) if packed else None
        if why:
            raise ValueError(f"packed texts: {why}")
        self.hf, self.pooling, self.normalize, self.packed = hf_model, pooling, normalize, packed

    def forward(self, input_ids: torch.Tensor | list[torch.Tensor],
                attention_mask: torch.Tensor | list[torch.Tensor] | None = None,
                position_ids: torch.Tensor | None = None, offsets: torch.Tensor | None = None,
                groups: list | None = None) -> torch.Tensor:
        if offsets is not None:
            emb = self.packed_forward(input_ids, position_ids, offsets, groups)
        elif isinstance(input_ids, torch.Tensor):
            hidden = self.hf(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            emb = pool(hidden, attention_mask, self.pooling).float()
        else:
            # One word-embedding lookup for all the groups, then one encoder pass per group: the gradient of the
            # table (dense, [vocab, H]: 47 MB for MiniLM) is made and added once per forward, not once per group.
            table = self.hf.get_input_embeddings()
            vectors = table(torch.cat([ids.reshape(-1) for ids in input_ids]))  # [sum of n_g * L_g, E]
            out, start = [], 0
            for ids, mask in zip(input_ids, attention_mask):
                x = vectors[start:start + ids.numel()].view(*ids.shape, -1)  # [n_g, L_g, E]
                start += ids.numel()
                hidden = self.hf(inputs_embeds=x, attention_mask=mask).last_hidden_state
                out.append(pool(hidden, mask, self.pooling).float())
            emb = torch.cat(out)
        return F.normalize(emb, p=2, dim=1) if self.normalize else emb

    def packed_forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, offsets: torch.Tensor,
                       groups: list) -> torch.Tensor:
        """[N, H] embeddings of packed texts (before normalisation): the pooling over each text's own tokens."""
        h = bert_packed(self.hf, input_ids, torch.zeros_like(input_ids), position_ids,
                        lambda att, x: grouped_attention(att, x, groups)).float()  # [T, H]
        return pool_packed(h, offsets, self.pooling)


# -- the sentence-transformers folder --------------------------------------------------------------------------
@dataclass(frozen=True)
class SentenceSettings:
    """What a sentence-transformers folder says beyond the Hugging Face model: its pooling, normalisation and
    longest input."""

    pooling: str = "mean"
    normalize: bool = True
    max_length: int | None = None
    model_dir: str = ""  # the Hugging Face model inside it (sentence-transformers' Transformer module)


def write_sentence_transformers(path: Path, hidden: int, s: SentenceSettings) -> None:
    """modules.json, sentence_bert_config.json, 1_Pooling/config.json (+ 2_Normalize/) beside a Hugging Face model
    in `path`: the folder loads with SentenceTransformer(path). The long-standing layout, which sentence-transformers
    2.x to 6.x read."""
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if s.normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        (path / "2_Normalize").mkdir(parents=True, exist_ok=True)
    (path / "1_Pooling").mkdir(parents=True, exist_ok=True)
    (path / "modules.json").write_text(json.dumps(modules, indent=2))
    (path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": s.max_length,
                                                                 "do_lower_case": False}, indent=2))
    (path / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": hidden, "pooling_mode_cls_token": s.pooling == "cls",
        "pooling_mode_mean_tokens": s.pooling == "mean", "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False}, indent=2))
    (path / "config_sentence_transformers.json").write_text(json.dumps({
        "similarity_fn_name": "cosine" if s.normalize else "dot"}, indent=2))


def read_sentence_transformers(path: str | Path) -> SentenceSettings | None:
    """The settings of a sentence-transformers folder (the old layout and sentence-transformers 5-6's), or None for
    a plain Hugging Face folder (no modules.json). ValueError for modules other than Transformer, Pooling (mean or
    cls) and Normalize."""
    path = Path(path)
    if not (path / "modules.json").is_file():
        return None
    modules = json.loads((path / "modules.json").read_text())
    kinds = {m["type"].rsplit(".", 1)[-1]: m for m in modules}
    other = sorted(set(kinds) - {"Transformer", "Pooling", "Normalize"})
    if other or "Transformer" not in kinds or "Pooling" not in kinds:
        raise ValueError(f"{path}/modules.json: modules {', '.join(m['type'] for m in modules)}; only a Transformer, "
                         "a Pooling (mean or cls) and an optional Normalize can be read")
    pooling_cfg = json.loads((path / kinds["Pooling"]["path"] / "config.json").read_text())
    mode = pooling_cfg.get("pooling_mode") or ("cls" if pooling_cfg.get("pooling_mode_cls_token") else
                                               "mean" if pooling_cfg.get("pooling_mode_mean_tokens") else "other")
    mode = {"mean_tokens": "mean", "cls_token": "cls"}.get(mode, mode)
    if mode not in POOLINGS:
        raise ValueError(f"{path}: pooling '{mode}' (in {kinds['Pooling']['path']}/config.json) is not supported; "
                         f"use one of: {', '.join(POOLINGS)}")
    model_dir = path / kinds["Transformer"]["path"]
    max_length = None
    for cfg_file in (model_dir / "sentence_bert_config.json", model_dir / "tokenizer_config.json"):
        if cfg_file.is_file():
            cfg = json.loads(cfg_file.read_text())
            max_length = cfg.get("max_seq_length") or cfg.get("model_max_length")
            if max_length and max_length < 1_000_000:  # transformers writes 1e30 for "no limit"
                break
            max_length = None
    return SentenceSettings(mode, "Normalize" in kinds, int(max_length) if max_length else None, str(model_dir))
