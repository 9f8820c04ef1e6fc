"""MLM pretraining described for the run assembly (launch/core/assemble.py): tokenizer, corpus, model, plan
arguments, the resume check, the task, and what its dry run shows of the data."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedTokenizerFast

from bertlaunch.core.dist import DistInfo
from bertlaunch.core.layout import resolve_model_dir
from bertlaunch.core.plan import Plan
from bertlaunch.core.task import Model, Resume
from bertlaunch.data.tokenize import TokenizerSpec, load_hf_tokenizer, load_spec
from bertlaunch.model.build import load_mlm
from bertlaunch.model.mlm import MaskedLM
from bertlaunch.model.packed import check_isolation, use_varlen
from bertlaunch.tasks.mlm.config import PretrainConfig, use_storage
from bertlaunch.tasks.mlm.corpus import Corpus, check_same_data, check_streams, resolve_corpus
from bertlaunch.tasks.mlm.describe import describe_corpus
from bertlaunch.tasks.mlm.task import MLMTask


@dataclass
class Tokenizer:
    spec: TokenizerSpec  # what the dataloader workers tokenize with
    hf: PreTrainedTokenizerFast  # saved with every checkpoint (hf_meta/) and used to decode the dry run's block


class PretrainSpec:
    def workers(self, cfg: PretrainConfig) -> int:
        return max(cfg.data.num_workers, 1)

    def longest(self, cfg: PretrainConfig) -> tuple[str, int]:
        return cfg.longest()

    def tokenizer(self, cfg: PretrainConfig) -> Tokenizer:
        return Tokenizer(load_spec(cfg.tokenizer), load_hf_tokenizer(cfg.tokenizer))

    def data(self, cfg: PretrainConfig, tok: Tokenizer, info: DistInfo) -> Corpus:
        use_storage(cfg.data)
        corpus = resolve_corpus(cfg.data, tok.spec)
        check_streams(cfg.data, corpus, info.world_size * self.workers(cfg))
        return corpus

    def model(self, cfg: PretrainConfig, tok: Tokenizer, data: Corpus | None, meta: bool) -> Model:
        m = cfg.model
        model_dir = resolve_model_dir(m.pretrained) if m.pretrained else None
        hf_model, config = load_mlm(m, tok.spec, model_dir, meta=meta)
        if cfg.data.isolate_documents:
            check_isolation(config)
            use_varlen(hf_model)  # varlen FlashAttention on GPUs; the masks below it are SDPA's
        module = MaskedLM(hf_model, sparse_head=m.sparse_mlm_head)
        if m.compile and not meta:
            hf_model.base_model.compile()

        def write_meta(path: Path) -> None:
            config.save_pretrained(path)
            tok.hf.save_pretrained(path)

        return Model(module, config, write_meta, m.preset or m.pretrained)

    def plan_args(self, cfg: PretrainConfig, data: Corpus | None) -> dict:
        return {"phases": cfg.phase_specs(), "warmup_tokens": cfg.train.warmup_tokens}

    def check_resume(self, cfg: PretrainConfig, data: Corpus, resume: Resume) -> None:
        check_same_data(data, resume.saved, resume.path)

    def task(self, cfg: PretrainConfig, info: DistInfo, tok: Tokenizer, data: Corpus, model: Model, plan: Plan,
             resume: Resume) -> MLMTask:
        return MLMTask(cfg, info, tok.spec, data, model.config, plan, resume, model.module)

    def describe(self, cfg: PretrainConfig, tok: Tokenizer, data: Corpus, plan: Plan, info: DistInfo) -> None:
        describe_corpus(cfg, tok.spec, tok.hf, data, info.world_size * self.workers(cfg), plan)


PRETRAIN = PretrainSpec()
