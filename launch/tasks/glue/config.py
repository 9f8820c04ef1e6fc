"""The GLUE suite's config: the fine-tuning sections every run shares, plus `glue` (which tasks, seeds, data,
per-task overrides). Each (task, seed) becomes an ordinary fine-tuning config (launch/tasks/glue/suite.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from bertlaunch.core.config import CheckpointConfig, DeepSpeedConfig, LogConfig, ModelConfig, validate_common
from bertlaunch.core.configlib import REQUIRED
from bertlaunch.data.tables.glue import TASKS, lookup, present, unknown_task_message
from bertlaunch.tasks.classify.config import FinetuneEvalConfig, FinetuneTrainConfig
from bertlaunch.tasks.glue.finetune import override_problems


@dataclass
class GlueSection:
    data_dir: str | None = None
    """The official glue_data/ folder (CoLA/, SST-2/, MRPC/, STS-B/, QQP/, MNLI/, QNLI/, RTE/, WNLI/,
    diagnostic/), read unchanged."""
    dataset: str | None = None
    """Instead of data_dir: the hub's GLUE dataset (nyu-mll/glue), when the hub can be reached."""
    tasks: list[str] | None = None
    """Tasks by GLUE's name, any case (CoLA, SST-2, MRPC, STS-B, QQP, MNLI, QNLI, RTE, WNLI); None: every
    task present in data_dir (all nine on the hub)."""
    seeds: list[int] = field(default_factory=lambda: [42])
    """One run per (task, seed), in output_dir/<task>/seed_<s>/; metrics are averaged over seeds."""
    overrides: dict[str, dict] = field(default_factory=dict)
    """Per-task fine-tuning settings over the shared ones, e.g. glue.overrides.RTE.train.lr=3e-5 or
    {RTE: {train: {epochs: 4}}}; any fine-tuning key below train/eval/task/checkpoint/model/deepspeed
    (except train.seed and train.dist_timeout_s, which every run of the suite shares)."""
    max_train_examples: int | None = None
    """Train on each task's first N training rows only (quick runs); None: all."""
    max_length: int = 128
    """Truncate every pair to this many tokens (the BERT paper's 128)."""
    from_mnli: list[str] = field(default_factory=list)
    """Tasks that start from the MNLI model of the same seed instead of model.pretrained, e.g.
    [RTE, MRPC, STS-B] as RoBERTa and MosaicBERT do (MNLI then runs first)."""
    parallel: int | Literal["auto"] = "auto"
    """Runs at once, each in its own process: auto = one per visible GPU (1 on a CPU: one after another,
    in this process). Under deepspeed/torchrun/srun with several ranks, runs go one after another on all."""
    run_index: int | None = None
    """Run only the i-th run of the suite's order (slurm/glue_array.sbatch: one array task per run); a
    final plain run skips the finished runs and writes the tables and submission."""
    reference: Literal["auto", "none", "bert-base-uncased"] = "auto"
    """Published dev numbers shown beside ours in glue_results.md: auto = by model.pretrained's name."""


@dataclass
class GlueTrainConfig(FinetuneTrainConfig):
    seed: int | None = None
    """Not set for GLUE (an error when set): each run's seed comes from glue.seeds."""


@dataclass
class GlueEvalConfig(FinetuneEvalConfig):
    metric: str | None = None
    """Not set for GLUE (an error when set): each task picks its best checkpoint by its first official metric;
    glue.overrides.<task>.eval.metric changes it for one task."""


# per-task override keys that cannot differ between the runs of one suite
NOT_PER_TASK = {("train", "seed"): "the seeds come from glue.seeds",
                ("train", "dist_timeout_s"): "one process group serves every run: set train.dist_timeout_s"}


@dataclass
class GlueConfig:
    output_dir: str = REQUIRED
    """glue_results.json/.md, submission/ (+ .zip) and one fine-tuning output_dir per run: <task>/seed_<s>/.
    $VAR / ${VAR} are expanded in each process (node-local scratch)."""
    tokenizer: str | None = None
    """Tokenizer folder (None: the one saved with model.pretrained)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """model.pretrained: a Hugging Face folder, our pretraining output_dir or its final/."""
    glue: GlueSection = field(default_factory=GlueSection)
    """Tasks, seeds, data and per-task overrides."""
    train: GlueTrainConfig = field(default_factory=lambda: GlueTrainConfig(lr=2e-5, weight_decay=0.01))
    """Optimization of every run (the BERT paper's recipe: batch 32, 3 epochs, 10% warmup; lr 2e-5 from its
    grid of 2e-5/3e-5/5e-5, weight decay 0.01)."""
    deepspeed: DeepSpeedConfig = field(default_factory=lambda: DeepSpeedConfig("ds_configs/zero0.json"))
    """DeepSpeed engine of every run."""
    eval: GlueEvalConfig = field(default_factory=GlueEvalConfig)
    """Evaluation of every run."""
    log: LogConfig = field(default_factory=LogConfig)
    """Metrics, progress bar and wandb (one wandb run per GLUE run)."""
    checkpoint: CheckpointConfig = field(default_factory=lambda: CheckpointConfig(keep_last=1))
    """Checkpoints and resume of every run."""

    def validate(self) -> list[str]:
        p = validate_common(self)
        g = self.glue
        if bool(g.data_dir) == bool(g.dataset):
            p.append("set exactly one of glue.data_dir (the official glue_data/ folder) or glue.dataset "
                     "(nyu-mll/glue, needs the hub)")
        elif g.data_dir and not Path(g.data_dir).is_dir():
            p.append(f"glue.data_dir: '{g.data_dir}' is not a folder (it should hold CoLA/, SST-2/, ...)")
        elif g.data_dir and not g.tasks and not present(g.data_dir):
            p.append(f"glue.data_dir: '{g.data_dir}' has none of the task folders {', '.join(TASKS)}")
        for key, names in (("tasks", g.tasks or []), ("from_mnli", g.from_mnli), ("overrides", list(g.overrides))):
            p += [f"glue.{key}: {unknown_task_message(n)}" for n in names if lookup(str(n)) is None]
        if any(lookup(str(n)) is not None and lookup(str(n)).name == "MNLI" for n in g.from_mnli):
            p.append("glue.from_mnli: MNLI cannot start from itself")
        for task, section in g.overrides.items():
            if not isinstance(section, dict):
                p.append(f"glue.overrides.{task}: expected a mapping like {{train: {{lr: 3e-5}}}}, got {section!r}")
            elif bad := sorted(set(section) - {"train", "eval", "task", "checkpoint", "model", "deepspeed"}):
                p.append(f"glue.overrides.{task}: cannot override {', '.join(bad)} per task (allowed: train, eval, "
                         "task, checkpoint, model, deepspeed)")
            else:
                p += [f"glue.overrides.{task}.{sec}.{key}: {why}" for (sec, key), why in NOT_PER_TASK.items()
                      if isinstance(section.get(sec), dict) and key in section[sec]]
        if self.train.seed is not None:
            p.append("train.seed is not used by GLUE: set glue.seeds (one run per seed), e.g. glue.seeds=[42]")
        if self.eval.metric is not None:
            p.append("eval.metric is not used by GLUE (each task has its official metric): set it for one task "
                     "with glue.overrides.<task>.eval.metric")
        if not g.seeds:
            p.append("glue.seeds is empty: give at least one seed, e.g. [42]")
        if len(set(g.seeds)) != len(g.seeds):
            p.append(f"glue.seeds has duplicates: {g.seeds}")
        if g.parallel != "auto" and g.parallel < 1:
            p.append(f"glue.parallel must be >= 1 or auto, got {g.parallel}")
        if g.max_train_examples is not None and g.max_train_examples < 1:
            p.append(f"glue.max_train_examples must be >= 1 (or null for all rows), got {g.max_train_examples}")
        if self.model.preset and not self.tokenizer:
            p.append("model.preset needs an explicit tokenizer (e.g. tokenizer=<folder>)")
        if all(isinstance(s, dict) for s in g.overrides.values()):
            p += override_problems(self)
        return p
