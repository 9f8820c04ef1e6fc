"""Sentence-embedding training described for the run assembly (launch/core/assemble.py): tokenizer, rows and the
BEIR set, the encoder, plan arguments, the resume check, the task and its dry-run view."""

from __future__ import annotations

import json
from pathlib import Path

from bertlaunch.core.checkpoint import CheckpointError
from bertlaunch.core.dist import DistInfo
from bertlaunch.core.layout import resolve_model_dir
from bertlaunch.core.plan import Plan
from bertlaunch.core.task import Model, Resume
from bertlaunch.data.corpus.embedded import resolve_model_alias
from bertlaunch.data.tokenize import load_hf_tokenizer
from bertlaunch.model.embed import (
    Encoder,
    SentenceSettings,
    load_encoder,
    read_sentence_transformers,
    write_sentence_transformers,
)
from bertlaunch.model.unpadded import packed_problem
from bertlaunch.tasks.embed.config import EmbedConfig
from bertlaunch.tasks.embed.data import EmbedData, load_embed_data
from bertlaunch.tasks.embed.task import EmbedTask


def encoder_dir(pretrained: str) -> str:
    """model.pretrained -> the Hugging Face folder inside: a sentence-transformers folder's Transformer module
    (its root, or 0_Transformer/ in old ones), a Hugging Face folder, or our run's output_dir (its final/)."""
    root = Path(resolve_model_alias(pretrained))
    st = read_sentence_transformers(root) if root.is_dir() else None
    return st.model_dir if st is not None else resolve_model_dir(pretrained)


def unpadded(cfg: EmbedConfig, hf_model) -> bool:
    """task.unpad resolved for `hf_model` (null: pad-free where it can be); ValueError naming why not for true."""
    why = packed_problem(hf_model) or ("model.compile=true: the pad-free path runs the BERT layers itself, so nothing "
                                       "would be compiled" if cfg.model.compile else None)
    if cfg.task.unpad and why:
        raise ValueError(f"task.unpad=true: {why}; set task.unpad=false (or null: pad-free only where it can be)")
    return why is None if cfg.task.unpad is None else cfg.task.unpad


class EmbedSpec:
    def workers(self, cfg: EmbedConfig) -> int:
        return 1  # rows are collated in the training process

    def longest(self, cfg: EmbedConfig) -> tuple[str, int]:
        return "task.max_length", cfg.task.max_length

    def tokenizer(self, cfg: EmbedConfig):
        return load_hf_tokenizer(cfg.tokenizer or encoder_dir(cfg.model.pretrained))

    def data(self, cfg: EmbedConfig, tok, info: DistInfo) -> EmbedData:
        return load_embed_data(cfg.task, tok)

    def model(self, cfg: EmbedConfig, tok, data: EmbedData | None, meta: bool) -> Model:
        m, t = cfg.model, cfg.task
        hf_model, config = load_encoder(m, encoder_dir(m.pretrained) if m.pretrained else None, len(tok),
                                        tok.pad_token_id, meta=meta)
        if m.compile and not meta:
            hf_model.compile()
        settings = SentenceSettings(t.pooling, t.normalize, t.max_length)

        def write_meta(path: Path) -> None:
            config.save_pretrained(path)
            tok.save_pretrained(path)
            (path / "task.json").write_text(json.dumps({"kind": "embedding", "pooling": t.pooling,
                                                        "normalize": t.normalize}))
            write_sentence_transformers(path, config.hidden_size, settings)

        return Model(Encoder(hf_model, t.pooling, t.normalize, unpadded(cfg, hf_model)), config, write_meta,
                     m.preset or m.pretrained)

    def plan_args(self, cfg: EmbedConfig, data: EmbedData | None) -> dict:
        return {"examples": len(data.train) if data is not None else 1, "epochs": cfg.train.epochs}

    def check_resume(self, cfg: EmbedConfig, data: EmbedData, resume: Resume) -> None:
        had, now = resume.saved.get("train_examples"), [data.train.path, len(data.train)]
        if had != now:
            raise CheckpointError(f"task.train_file changed since {resume.path}: it had {had}, now {now}")

    def task(self, cfg: EmbedConfig, info: DistInfo, tok, data: EmbedData, model: Model, plan: Plan,
             resume: Resume) -> EmbedTask:
        return EmbedTask(cfg, info, data, model.config, plan, resume, model.module.packed)

    def describe(self, cfg: EmbedConfig, tok, data: EmbedData, plan: Plan, info: DistInfo) -> None:
        t, train = cfg.task, data.train
        first = plan.phases[0]
        negatives = plan.global_batch if t.grad_cache or first.accum == 1 else first.micro * info.world_size
        print(f"task          sentence embeddings: {t.pooling} pooling, "
              + ("normalised (cosine)" if t.normalize else "dot product") + f"; InfoNCE, temperature {t.temperature:g}"
              + f"; {negatives} in-batch positives per query" + (" + their hard negatives" if t.negative else "")
              + (", gathered from every rank" if info.world_size > 1 else "")
              + ("; GradCache over the global batch" if t.grad_cache else "") + f"; {plan.total_steps} steps")
        print(f"rows          {len(train)} (columns {', '.join(repr(c) for c in train.columns)}; {train.path})")
        lengths = [col_lengths for col_lengths in ([len(x) for x in col] for col in train.texts)]
        print("lengths       " + ", ".join(f"{c} mean {sum(ls) / len(ls):.1f} max {max(ls)}"
                                           for c, ls in zip(train.columns, lengths))
              + f" tokens (task.max_length {t.max_length}); tokenizer vocab {len(tok)}")
        pad_free = {None: "pad-free where the model allows it (BERT, MiniLM), else padded", True: "pad-free",
                    False: "padded"}[t.unpad]
        print(f"              each micro-batch's texts sorted by length, {t.length_groups} length groups, "
              f"{pad_free} (task.length_groups, task.unpad)")
        if first.accum > 1 and not t.grad_cache:
            print(f"  note: with accumulation ({first.accum} micro-batches per step) a query's in-batch negatives are "
                  f"its micro-batch on every rank ({first.micro} x {info.world_size}), not the global batch of "
                  f"{plan.global_batch}: set task.grad_cache=true for the whole global batch")
        if data.eval is not None:
            b = data.eval.beir
            print(f"eval          {b.root} (split {b.split}): {len(b.query_ids)} queries, {len(b.corpus_ids)} "
                  f"documents; nDCG@10, Recall@100, MRR@10 at every evaluation, best checkpoint by nDCG@10")
        if cfg.model.pretrained:
            st = read_sentence_transformers(Path(resolve_model_alias(cfg.model.pretrained)))
            if st is not None and (st.pooling, st.normalize) != (t.pooling, t.normalize):
                print(f"  note: model.pretrained is a sentence-transformers model with {st.pooling} pooling"
                      + (", normalised" if st.normalize else "") + f"; this run trains with task.pooling={t.pooling}, "
                      f"task.normalize={str(t.normalize).lower()}")
        for c, texts in zip(train.columns, train.texts):
            print(f"example 0     {c}: {tok.decode(texts[0].tolist())[:200]}")


EMBED = EmbedSpec()
