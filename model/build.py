"""Build encoders: presets from transformers' BertConfig, or any local Hugging Face model folder.

`meta=True` builds the same model on the meta device (no memory, no weights read): what the dry run counts.
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForMaskedLM, BertConfig, BertForMaskedLM

from bertlaunch.model.presets import PRESETS


def preset_config(name: str, vocab_size: int, pad_id: int, max_positions: int = 512,
                  attn_implementation: str = "sdpa"):
    layers, hidden, heads, inter = PRESETS[name]
    return BertConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, intermediate_size=inter, pad_token_id=pad_id,
                      max_position_embeddings=max_positions, attn_implementation=attn_implementation)


def apply_dropout(config, hidden: float | None, attention: float | None) -> None:
    if hidden is not None:
        config.hidden_dropout_prob = hidden
    if attention is not None:
        config.attention_probs_dropout_prob = attention


def padded_vocab(n: int, multiple: int | None) -> int:
    """n rounded up to a multiple (GPU matrix units like vocabulary dimensions divisible by 64)."""
    return -(-n // multiple) * multiple if multiple else n


def pad_embeddings(model, multiple: int | None) -> None:
    """Grow a loaded model's vocabulary rows to a multiple; the new rows are never a target or an input."""
    rows = model.get_input_embeddings().num_embeddings
    if multiple and rows % multiple:
        model.resize_token_embeddings(padded_vocab(rows, multiple), mean_resizing=False)


def check_vocab(model_vocab: int, tokenizer_vocab: int, where: str) -> None:
    if tokenizer_vocab > model_vocab:
        raise ValueError(f"{where}: the tokenizer has {tokenizer_vocab} tokens but the model's embedding has "
                         f"{model_vocab}: ids past {model_vocab - 1} would crash; use the tokenizer that was "
                         "trained with this model (set tokenizer=<model folder>)")


def load_mlm(model_cfg, spec, model_dir: str | None, meta: bool = False):
    """-> (transformers masked-LM model, its config): the preset model_cfg.preset, or the folder `model_dir`.
    Weights come from the torch seed the caller set (a preset) or the folder."""
    if model_cfg.preset:
        config = preset_config(model_cfg.preset, padded_vocab(spec.vocab_size, model_cfg.pad_vocab_to_multiple_of),
                               spec.pad_id, model_cfg.max_position_embeddings, model_cfg.attn_implementation)
        apply_dropout(config, model_cfg.hidden_dropout, model_cfg.attention_dropout)
        with torch.device("meta" if meta else "cpu"):
            model = BertForMaskedLM(config)
    else:
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=model_cfg.trust_remote_code)
        apply_dropout(config, model_cfg.hidden_dropout, model_cfg.attention_dropout)
        if meta:
            config.vocab_size = padded_vocab(config.vocab_size, model_cfg.pad_vocab_to_multiple_of)
            with torch.device("meta"):
                model = AutoModelForMaskedLM.from_config(config, attn_implementation=model_cfg.attn_implementation,
                                                         trust_remote_code=model_cfg.trust_remote_code)
        else:
            model = AutoModelForMaskedLM.from_pretrained(model_dir, config=config, attn_implementation=
                                                         model_cfg.attn_implementation,
                                                         trust_remote_code=model_cfg.trust_remote_code)
            pad_embeddings(model, model_cfg.pad_vocab_to_multiple_of)
        config = model.config
    check_vocab(model.get_input_embeddings().num_embeddings, spec.vocab_size,
                model_dir or f"preset {model_cfg.preset}")
    return model, config


def check_positions(config, length: int, key: str) -> None:
    """The one position check: `key` asks for `length` tokens; the model must have that many positions."""
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and length > limit:
        raise ValueError(f"{key}={length} exceeds the model's max_position_embeddings={limit}: lower {key}")
