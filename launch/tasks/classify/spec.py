"""Classification / regression fine-tuning described for the run assembly (launch/core/assemble.py):
tokenizer, task tables, classifier, plan arguments, the resume check, the task and its dry-run view."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from bertlaunch.core.checkpoint import CheckpointError
from bertlaunch.core.dist import DistInfo
from bertlaunch.core.layout import resolve_model_dir
from bertlaunch.core.plan import Plan
from bertlaunch.core.task import Model, Resume
from bertlaunch.data.tables.load import TaskData, load_task_data
from bertlaunch.data.tables.pairs import collate
from bertlaunch.data.tokenize import load_hf_tokenizer
from bertlaunch.model.classify import Classifier, load_classifier
from bertlaunch.model.unpadded import check_unpadded
from bertlaunch.tasks.classify.config import FinetuneConfig
from bertlaunch.tasks.classify.scores import metric_names
from bertlaunch.tasks.classify.task import ClassifyTask


class FinetuneSpec:
    def workers(self, cfg: FinetuneConfig) -> int:
        return 1  # examples are collated in the training process

    def longest(self, cfg: FinetuneConfig) -> tuple[str, int]:
        return "task.max_length", cfg.task.max_length

    def tokenizer(self, cfg: FinetuneConfig):
        """task tables are tokenized with the run's tokenizer (default: the one saved with the model)."""
        return load_hf_tokenizer(cfg.tokenizer or resolve_model_dir(cfg.model.pretrained))

    def data(self, cfg: FinetuneConfig, tok, info: DistInfo) -> TaskData:
        data = load_task_data(cfg.task, tok)
        names, metric = metric_names(data.labels.kind, data.labels.num_labels), cfg.eval.metric
        if metric is not None and metric not in names:  # found now, not at the first evaluation
            kind = "regression" if data.labels.kind == "regression" else f"{data.labels.num_labels}-class"
            raise ValueError(f"eval.metric={metric} does not exist for {data.train_path} ({kind} labels): use one "
                             f"of {', '.join(names)}")
        return data

    def model(self, cfg: FinetuneConfig, tok, data: TaskData | None, meta: bool) -> Model | None:
        if data is None:  # the label space comes from the training table
            return None
        m, labels = cfg.model, data.labels
        regression = labels.kind == "regression"
        id2label = None if regression else dict(enumerate(labels.names))
        model_dir = resolve_model_dir(m.pretrained) if m.pretrained else None
        hf_model, config = load_classifier(m, model_dir, labels.num_labels, id2label, regression, len(tok),
                                           data.pad_id, meta=meta)
        if cfg.task.unpad:
            check_unpadded(hf_model, m.compile)
        if m.compile and not meta:
            hf_model.base_model.compile()  # the encoder; the small head stays eager

        def write_meta(path: Path) -> None:
            config.save_pretrained(path)
            tok.save_pretrained(path)
            (path / "task.json").write_text(json.dumps({"kind": "classification"}))

        return Model(Classifier(hf_model, regression), config, write_meta, m.preset or m.pretrained)

    def plan_args(self, cfg: FinetuneConfig, data: TaskData | None) -> dict:
        return {"examples": len(data.train) if data is not None else 1, "epochs": cfg.train.epochs}

    def check_resume(self, cfg: FinetuneConfig, data: TaskData, resume: Resume) -> None:
        had, now = resume.saved.get("train_examples"), [data.train_path, len(data.train)]
        if had != now:
            raise CheckpointError(f"task.train_file changed since {resume.path}: it had {had}, now {now}")

    def task(self, cfg: FinetuneConfig, info: DistInfo, tok, data: TaskData, model: Model, plan: Plan,
             resume: Resume) -> ClassifyTask:
        return ClassifyTask(cfg, info, data, model.config, plan, resume)

    def describe(self, cfg: FinetuneConfig, tok, data: TaskData, plan: Plan, info: DistInfo) -> None:
        labels, t = data.labels, cfg.task
        sizes = [("train", len(data.train))] + ([("eval", len(data.eval))] if data.eval is not None else []) \
            + [(f"eval {n}", len(e)) for n, e in data.extra_eval.items()] \
            + ([("test", len(data.test.enc))] if data.test is not None else []) \
            + [(f"test {n}", len(tb.enc)) for n, tb in data.extra_test.items()]
        print(f"task          {labels.kind}, {labels.num_labels} output(s)"
              + (f", labels {labels.names}" if labels.names else "") + f"; {plan.total_steps} steps")
        print(f"tables        {', '.join(f'{k} {n}' for k, n in sizes)} examples; columns {t.text_a!r}"
              + (f" + {t.text_b!r}" if t.text_b else "") + f" -> {t.label!r} ({data.train_path})")
        print(f"lengths       mean {data.train.lengths.mean():.1f}, max {data.train.lengths.max()} tokens "
              f"(task.max_length {cfg.task.max_length}); tokenizer vocab {len(tok)}")
        batch = collate(data.train, np.arange(min(2, len(data.train))), data.pad_id, labels.kind == "regression")
        for row in range(batch["meta"]["n"]):
            lab = batch["labels"][row].item()
            name = labels.names[int(lab)] if labels.kind != "regression" else f"{lab:.3g}"
            print(f"example {row}     [{name}] {tok.decode(batch['input_ids'][row].tolist())[:300]}")


FINETUNE = FinetuneSpec()
