"""Tiny masked-LM folders of each encoder family transformers ships (hidden 32, 2 layers, the bert-base-uncased
vocab and tokenizer saved beside them), for the tests that take a model folder through every entry point."""

from __future__ import annotations

from pathlib import Path

SIZE = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "vocab_size": 30522, "pad_token_id": 0}


def family_config(family: str):
    from transformers import BertConfig, DebertaV2Config, ElectraConfig, ModernBertConfig, RobertaConfig

    if family == "modernbert":  # a window of 16 tokens, so that 64-token blocks use it
        return ModernBertConfig(**SIZE, intermediate_size=48, local_attention=16, cls_token_id=101, sep_token_id=102,
                                bos_token_id=101, eos_token_id=102, max_position_embeddings=512)
    if family == "roberta":
        return RobertaConfig(**SIZE, intermediate_size=64, max_position_embeddings=130, bos_token_id=101,
                             eos_token_id=102)
    if family == "deberta-v2":
        return DebertaV2Config(**SIZE, intermediate_size=64, max_position_embeddings=128, relative_attention=True,
                               pos_att_type=["p2c", "c2p"], position_biased_input=False, legacy=False)
    if family == "electra":
        return ElectraConfig(**SIZE, embedding_size=32, intermediate_size=64, max_position_embeddings=128)
    return BertConfig(**SIZE, intermediate_size=64, max_position_embeddings=128)


def family_folder(root: Path, family: str) -> Path:
    """root/<family>: a fresh (seeded) masked-LM model of the family, saved with the offline BERT tokenizer."""
    import torch
    from transformers import AutoModelForMaskedLM

    from bertlaunch.data.tokenize import load_hf_tokenizer

    folder = root / family
    if not (folder / "config.json").is_file():
        torch.manual_seed(0)
        AutoModelForMaskedLM.from_config(family_config(family)).save_pretrained(folder)
        load_hf_tokenizer("bert-base-uncased").save_pretrained(folder)
    return folder
