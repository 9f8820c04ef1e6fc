"""MLM pretraining, wired: config -> plan -> resume choice -> model, task, tracker -> Trainer.fit()."""

from __future__ import annotations

from pathlib import Path

from launch.cli.entry import entry
from launch.tasks.mlm.config import PretrainConfig, use_storage


def main(argv=None) -> int:
    def dry_run(cfg):
        from launch.cli.dryrun import dry_run_pretrain

        return dry_run_pretrain(cfg)

    return entry(argv, "launch/pretrain.py", "MLM pretraining of BERT-style encoders under DeepSpeed.",
                 PretrainConfig, dry_run, run)


def run(cfg: PretrainConfig, info) -> int:
    from data.tokenize import load_hf_tokenizer, load_spec
    from launch.core import session as sess
    from launch.core.plan import plan
    from launch.core.seeding import seed_everything, seed_rank
    from launch.core.tracking import make_tracker
    from launch.tasks.mlm.task import MLMTask
    from model.build import check_positions, load_mlm
    from model.mlm import MaskedLM

    use_storage(cfg.data)
    spec = load_spec(cfg.tokenizer)
    seed_everything(cfg.train.seed)
    hf_model, hf_config = load_mlm(cfg.model, spec, cfg.train.seed)  # same initial weights on every rank
    check_positions(hf_config, cfg.max_block_size(), "data.block_size / train.phases[].block_size")
    seed_rank(cfg.train.seed, info.rank)  # distinct dropout per rank (restored on resume)
    p = plan(cfg, info.world_size, hidden_size=hf_config.hidden_size, phases=cfg.phase_specs(),
             warmup_tokens=cfg.train.warmup_tokens)
    s = sess.open_session(cfg, info, p, max(cfg.data.num_workers, 1))
    task = MLMTask(cfg, info, spec, hf_config, s)
    module = MaskedLM(hf_model, sparse_head=cfg.model.sparse_mlm_head)
    if cfg.model.compile:
        hf_model.base_model.compile()
    hf_tok = load_hf_tokenizer(cfg.tokenizer)

    def meta_writer(path: Path) -> None:
        hf_config.save_pretrained(path)
        hf_tok.save_pretrained(path)

    tracker = make_tracker(cfg, info, s) if info.is_main else None
    trainer = sess.start(s, module, task, tracker=tracker, meta_writer=meta_writer)
    if s.saved and s.saved["world_size"] != info.world_size:  # RNG streams cannot be re-split: reseed
        seed_rank(cfg.train.seed, info.rank, trainer.state.step)
    return trainer.fit()
