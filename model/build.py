"""Build encoders: presets from transformers' BertConfig or ModernBertConfig, or any local Hugging Face model folder.

`meta=True` builds the same model on the meta device (no memory, no weights read): what the dry run counts.
"""

from __future__ import annotations

import torch
from transformers import (
    AutoConfig,
    AutoModelForMaskedLM,
    BertConfig,
    BertForMaskedLM,
    ModernBertConfig,
    ModernBertForMaskedLM,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING, MODEL_FOR_MASKED_LM_MAPPING_NAMES

from bertlaunch.model.presets import ALL_PRESETS, MODERNBERT_GLOBAL_EVERY, MODERNBERT_WINDOW, family

ROPE_DEFAULT_POSITIONS = 8192  # a ModernBERT preset's context (its released models' max_position_embeddings)


def preset_config(name: str, vocab_size: int, pad_id: int, max_positions: int | None = None,
                  attn_implementation: str = "sdpa", cls_id: int | None = None, sep_id: int | None = None):
    layers, hidden, heads, inter = ALL_PRESETS[name]
    if family(name) == "modernbert":  # RoPE (global 160k / local 10k, as released), GeGLU, local window 128
        return ModernBertConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                                num_attention_heads=heads, intermediate_size=inter, pad_token_id=pad_id,
                                cls_token_id=cls_id, sep_token_id=sep_id, bos_token_id=cls_id, eos_token_id=sep_id,
                                max_position_embeddings=max_positions or ROPE_DEFAULT_POSITIONS,
                                local_attention=MODERNBERT_WINDOW, global_attn_every_n_layers=MODERNBERT_GLOBAL_EVERY,
                                attn_implementation=attn_implementation)
    return BertConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, intermediate_size=inter, pad_token_id=pad_id,
                      max_position_embeddings=max_positions or 512, attn_implementation=attn_implementation)


def rope_kind(config) -> str | None:
    """'per_layer_type' (ModernBERT: a base for global and one for local layers), 'single', or None (no RoPE)."""
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and params:
        return "per_layer_type" if all(isinstance(v, dict) for v in params.values()) else "single"
    return "single" if getattr(config, "rope_theta", None) is not None else None


def rope_bases(config) -> dict[str, float]:
    """{'global': base, 'local': base} (ModernBERT), {'all': base}, or {} for a model without RoPE."""
    kind, params = rope_kind(config), getattr(config, "rope_parameters", None)
    if kind == "per_layer_type":
        names = {"full_attention": "global", "sliding_attention": "local"}
        return {names.get(k, k): v.get("rope_theta") for k, v in params.items()}
    if kind == "single":
        return {"all": params.get("rope_theta") if isinstance(params, dict) else config.rope_theta}
    return {}


def set_rope_bases(config, global_base: float | None, local_base: float | None, where: str = "model.rope_theta"
                   ) -> bool:
    """Set the RoPE base of the global (or only) attention layers and of the local ones on `config`; True when
    something changed. ValueError naming `where` for a model without RoPE (its positions are learned)."""
    if global_base is None and local_base is None:
        return False
    kind = rope_kind(config)
    if kind is None:
        positions = getattr(config, "position_embedding_type", "absolute")
        raise ValueError(f"{where}: a {config.model_type} model has no rotary position embedding (its positions are "
                         f"{positions}, learned); RoPE bases apply to RoPE models such as ModernBERT: remove it")
    before = rope_bases(config)
    if kind == "per_layer_type":
        for layer_type, base in (("full_attention", global_base), ("sliding_attention", local_base)):
            if base is not None and layer_type in config.rope_parameters:
                config.rope_parameters[layer_type]["rope_theta"] = float(base)
    elif local_base is not None:
        raise ValueError(f"{where}: a {config.model_type} model has one RoPE base for all layers: set "
                         "model.rope_theta only")
    elif isinstance(getattr(config, "rope_parameters", None), dict):
        config.rope_parameters["rope_theta"] = float(global_base)
    else:
        config.rope_theta = float(global_base)
    return rope_bases(config) != before


def refresh_rope(hf_model) -> None:
    """Recompute the rotary frequencies of a built model from its config (after set_rope_bases). They are
    buffers derived from the config, not weights: checkpoints do not hold them."""
    for module in list(hf_model.modules()):
        if type(module).__name__.endswith("RotaryEmbedding"):
            fresh = type(module)(hf_model.config)
            for name, buf in fresh.named_buffers(recurse=False):
                getattr(module, name).copy_(buf)
            for name, value in vars(fresh).items():
                if name.endswith("attention_scaling"):
                    setattr(module, name, value)


def apply_dropout(config, hidden: float | None, attention: float | None) -> None:
    """BERT-style names; ModernBERT's: hidden -> its MLP and embedding dropout, attention -> attention_dropout."""
    modern = config.model_type == "modernbert"
    if hidden is not None:
        for key in ("mlp_dropout", "embedding_dropout") if modern else ("hidden_dropout_prob",):
            setattr(config, key, hidden)
    if attention is not None:
        setattr(config, "attention_dropout" if modern else "attention_probs_dropout_prob", attention)


def configure(config, model_cfg) -> None:
    """The model section's overrides of a preset's or a folder's config: dropout, positions (RoPE models:
    no learned table, so the context may be raised), RoPE bases."""
    apply_dropout(config, model_cfg.hidden_dropout, model_cfg.attention_dropout)
    if model_cfg.max_position_embeddings is not None and not model_cfg.preset:
        if rope_kind(config) is None:
            raise ValueError(f"model.max_position_embeddings: a {config.model_type} model has "
                             f"{config.max_position_embeddings} learned positions, fixed by its weights: remove it")
        config.max_position_embeddings = model_cfg.max_position_embeddings
    set_rope_bases(config, model_cfg.rope_theta, model_cfg.local_rope_theta)


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
                               spec.pad_id, model_cfg.max_position_embeddings, model_cfg.attn_implementation,
                               getattr(spec, "cls_id", None), getattr(spec, "sep_id", None))
        configure(config, model_cfg)
        with torch.device("meta" if meta else "cpu"):
            model = (ModernBertForMaskedLM if family(model_cfg.preset) == "modernbert" else BertForMaskedLM)(config)
    else:
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=model_cfg.trust_remote_code)
        check_masked_lm(config, model_dir, model_cfg.trust_remote_code)
        configure(config, model_cfg)
        if meta:
            config.vocab_size = padded_vocab(config.vocab_size, model_cfg.pad_vocab_to_multiple_of)
            with torch.device("meta"):
                model = AutoModelForMaskedLM.from_config(config, attn_implementation=attention_kernel(
                    config, model_cfg.attn_implementation), trust_remote_code=model_cfg.trust_remote_code)
        else:
            model = AutoModelForMaskedLM.from_pretrained(model_dir, config=config, attn_implementation=
                                                         attention_kernel(config, model_cfg.attn_implementation),
                                                         trust_remote_code=model_cfg.trust_remote_code)
            pad_embeddings(model, model_cfg.pad_vocab_to_multiple_of)
        config = model.config
    check_vocab(model.get_input_embeddings().num_embeddings, spec.vocab_size,
                model_dir or f"preset {model_cfg.preset}")
    return model, config


def attention_kernel(config, wanted: str, mapping=MODEL_FOR_MASKED_LM_MAPPING) -> str:
    """model.attn_implementation, or eager for a model class without SDPA attention (DeBERTa-v2)."""
    cls = mapping[type(config)] if type(config) in mapping else None
    return "eager" if wanted == "sdpa" and cls is not None and not getattr(cls, "_supports_sdpa", True) else wanted


def check_masked_lm(config, model_dir: str, remote_code: bool) -> None:
    """ValueError naming the folder unless transformers has a masked-LM class for its model type."""
    if config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES or (
            remote_code and "AutoModelForMaskedLM" in (getattr(config, "auto_map", None) or {})):
        return
    classes = ", ".join(config.architectures or [])
    raise ValueError(f"model.pretrained {model_dir}: a {config.model_type} model ({classes}) has no masked-language-"
                     "model head in transformers, so it cannot be pretrained with MLM; use an encoder "
                     "with one (BERT, RoBERTa, ModernBERT, DeBERTa-v2, ELECTRA, ...)")


def check_positions(config, length: int, key: str) -> None:
    """The one position check: `key` asks for `length` tokens; the model must have that many positions."""
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and length > limit:
        fix = (f"lower {key}, or raise model.max_position_embeddings (rotary positions: no learned table)"
               if rope_kind(config) else f"lower {key}")
        raise ValueError(f"{key}={length} exceeds the model's max_position_embeddings={limit}: {fix}")
