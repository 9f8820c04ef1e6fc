"""Fine-tuning, wired: config -> task tables -> plan -> resume choice -> classifier, task -> Trainer.fit()."""

from __future__ import annotations

from launch.cli.entry import entry
from launch.tasks.classify.config import FinetuneConfig


def main(argv=None) -> int:
    def dry_run(cfg):
        from launch.cli.dryrun import dry_run_finetune

        return dry_run_finetune(cfg)

    return entry(argv, "launch/finetune.py", "Fine-tune a BERT-style encoder on a sentence(-pair) task.",
                 FinetuneConfig, dry_run, run)


def load_data(cfg: FinetuneConfig):
    """The task tables, tokenized with the run's tokenizer (default: the one saved with the model)."""
    from data.task_data import load_task_data
    from data.tokenize import load_hf_tokenizer
    from model.build import resolve_model_dir

    return load_task_data(cfg.task, load_hf_tokenizer(cfg.tokenizer or resolve_model_dir(cfg.model.pretrained)))


def run(cfg: FinetuneConfig, info) -> int:
    from launch.core import session as sess
    from launch.core.plan import plan
    from launch.core.seeding import seed_everything, seed_rank
    from launch.core.tracking import make_tracker
    from launch.tasks.classify.outputs import meta_writer_for
    from launch.tasks.classify.task import ClassifyTask
    from model.build import check_positions
    from model.classify import Classifier, load_classifier
    from model.unpadded import check_unpadded

    data = load_data(cfg)
    seed_everything(cfg.train.seed)
    labels = data.labels
    id2label = None if labels.kind == "regression" else dict(enumerate(labels.names))
    hf_model, hf_config = load_classifier(cfg.model, labels.num_labels, id2label, labels.kind == "regression",
                                          len(data.tokenizer), cfg.train.seed, data.pad_id)
    check_positions(hf_config, cfg.task.max_length, "task.max_length")
    if cfg.task.unpad:
        check_unpadded(hf_model)
    seed_rank(cfg.train.seed, info.rank)
    p = plan(cfg, info.world_size, hidden_size=hf_config.hidden_size, examples=len(data.train),
             epochs=cfg.train.epochs)
    s = sess.open_session(cfg, info, p, 1)
    task = ClassifyTask(cfg, info, data, hf_config, s)
    tracker = make_tracker(cfg, info, s) if info.is_main else None
    trainer = sess.start(s, Classifier(hf_model, labels.kind == "regression"), task, tracker=tracker,
                         meta_writer=meta_writer_for(hf_config, data.tokenizer))
    if s.saved and s.saved["world_size"] != info.world_size:  # RNG streams cannot be re-split: reseed
        seed_rank(cfg.train.seed, info.rank, trainer.state.step)
    return trainer.fit()
