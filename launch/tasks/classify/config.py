"""The fine-tuning config: the shared sections (launch/core/config.py) plus the task table and columns (`task`)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from bertlaunch.core.config import (
    CheckpointConfig,
    DeepSpeedConfig,
    EvalConfig,
    LogConfig,
    ModelConfig,
    TrainConfig,
    validate_common,
)
from bertlaunch.core.configlib import REQUIRED


@dataclass
class TaskConfig:
    train_file: str | None = None
    """Training table: .tsv (read with quoting off), .csv or .jsonl, with a header / keys."""
    eval_file: str | None = None
    """Evaluation table, same columns (labels required)."""
    test_file: str | None = None
    """Table to predict; written to output_dir/predictions.tsv (labels optional: scored when present)."""
    format: Literal["auto", "tsv", "csv", "jsonl"] = "auto"
    """Table format (auto: from the file extension)."""
    dataset: str | None = None
    """A `datasets` hub name instead of files (needs hub access), e.g. glue with dataset_config=mrpc."""
    dataset_config: str | None = None
    """The hub dataset's configuration name."""
    train_split: str = "train"
    """Hub split for training."""
    eval_split: str | None = "validation"
    """Hub split for evaluation."""
    test_split: str | None = None
    """Hub split to predict."""
    extra_eval: dict[str, str] = field(default_factory=dict)
    """More labelled tables scored at every evaluation, name -> file (a split name with task.dataset), e.g.
    {mm: dev_mismatched.tsv} for MNLI: metrics eval_<name>_<metric>; the best checkpoint still follows
    task.eval_file."""
    extra_test: dict[str, str] = field(default_factory=dict)
    """More tables to predict at the end, name -> file (a split name with task.dataset): written to
    output_dir/predictions_<name>.tsv (scored in eval_results.json when labelled)."""
    columns: list[str] | None = None
    """Column names, in order, for .tsv/.csv tables without a header line (GLUE's CoLA train/dev). A table
    whose first line has a field named task.text_a is still read with its own header (CoLA's test)."""
    max_train_examples: int | None = None
    """Train on the first N rows of the training table only (quick runs); None: all of it."""
    text_a: str = "sentence1"
    """Column of the first sentence."""
    text_b: str | None = "sentence2"
    """Column of the second sentence (null: single-sentence task)."""
    label: str = "label"
    """Column of the label."""
    labels: list[str] | None = None
    """Explicit label names in id order (default: inferred from the training file)."""
    problem: Literal["auto", "classification", "regression"] = "auto"
    """auto: float labels make a regression (one output, MSE), anything else classification."""
    max_length: int = 128
    """Truncate pairs to this many tokens (longest first)."""
    length_grouping: bool = True
    """Group examples of similar length into batches (randomised, reproducible from train.seed)."""
    group_factor: int = 50
    """Mega-batch size in global batches for length grouping (larger: less padding, less randomness)."""
    pad_to_multiple_of: int | None = None
    """Round each batch's width up (8 helps tensor cores on GPUs); None: pad to the longest only."""
    unpad: bool = False
    """Pad-free batches: the examples packed end to end and attention run per example (nested tensors +
    SDPA: FlashAttention on GPUs), so no pad token is computed; the padded path's results up to float
    rounding. BertForSequenceClassification (BERT, MiniLM) and ModernBertForSequenceClassification models;
    pad_to_multiple_of does not apply."""


@dataclass
class FinetuneTrainConfig(TrainConfig):
    max_steps: int | None = None
    """Optimizer steps (overrides train.epochs when set)."""
    epochs: float = 3.0
    """Passes over the training file."""
    micro_batch_size: int = 32
    """Examples per rank per forward pass, at most (a memory setting: the largest that divides the global batch's
    share of one rank is used)."""
    global_batch_size: int | None = 32
    """Examples per optimizer step over all ranks: the recipe, the same at any GPU count (the BERT paper's 32)."""
    lr: float = 5e-5
    """Peak learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay (HF Trainer's default is 0)."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    warmup_ratio: float = 0.1
    """Warmup as a fraction of all steps, used when train.warmup_steps is 0 (BERT's fine-tuning recipe:
    10%)."""


@dataclass
class FinetuneEvalConfig(EvalConfig):
    every: int = 0
    """Evaluate every N steps (0: at the end of every epoch)."""
    metric: str | None = None
    """Metric that picks the best checkpoint: accuracy, f1 and matthews (binary labels), accuracy and macro_f1
    (multi-class), pearson, spearman and mse (regression), eval_loss (any); a name the labels do not have is an
    error before training (default: accuracy for binary, macro_f1 for multi-class, pearson for regression)."""
    save_best: bool = True
    """Keep the best checkpoint (protected from keep_last) and make output_dir/final from it."""
    micro_batch_size: int | None = 64
    """Eval batch size per rank."""


@dataclass
class FinetuneConfig:
    output_dir: str = REQUIRED
    """Where config.yaml, metrics.jsonl, eval_results.json, predictions.tsv, checkpoints/, final/ go. $VAR / ${VAR}
    are expanded in each process (node-local scratch)."""
    tokenizer: str | None = None
    """Tokenizer folder (None: the one saved with model.pretrained)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """model.pretrained: a Hugging Face folder, our pretraining output_dir or its final/."""
    task: TaskConfig = field(default_factory=TaskConfig)
    """Data and columns."""
    train: FinetuneTrainConfig = field(default_factory=FinetuneTrainConfig)
    """Optimization."""
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    """DeepSpeed engine."""
    eval: FinetuneEvalConfig = field(default_factory=FinetuneEvalConfig)
    """Evaluation and best checkpoint."""
    log: LogConfig = field(default_factory=LogConfig)
    """Metrics, progress bar and wandb."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoints and resume."""

    def validate(self) -> list[str]:
        p = validate_common(self)
        t = self.task
        if self.model.preset and not self.tokenizer:
            p.append("model.preset needs an explicit tokenizer (e.g. tokenizer=bert-base-uncased)")
        if not (t.train_file or t.dataset):
            p.append("no training data: set task.train_file (a .tsv/.csv/.jsonl table) or task.dataset")
        for key in ("train_file", "eval_file", "test_file"):
            path = getattr(t, key)
            if path and not Path(path).is_file():
                p.append(f"task.{key}: '{path}' does not exist")
        for key in ("extra_eval", "extra_test"):
            for name, ref in getattr(t, key).items():
                if not re.fullmatch(r"[A-Za-z0-9_]+", str(name)):
                    p.append(f"task.{key}: name '{name}' must be letters, digits and _ (it names metrics and files)")
                if not t.dataset and not Path(str(ref)).is_file():
                    p.append(f"task.{key}.{name}: '{ref}' does not exist")
        if t.max_train_examples is not None and t.max_train_examples < 1:
            p.append(f"task.max_train_examples must be >= 1 (or null for all rows), got {t.max_train_examples}")
        if t.max_length is not None and t.max_length < 8:
            p.append(f"task.max_length must be >= 8, got {t.max_length}")
        if self.train.epochs is not None and self.train.epochs <= 0 and not self.train.max_steps:
            p.append(f"train.epochs must be > 0, got {self.train.epochs}")
        metrics = ("accuracy", "f1", "matthews", "macro_f1", "pearson", "spearman", "eval_loss", "mse")
        if self.eval.metric is not None and self.eval.metric not in metrics:
            p.append(f"eval.metric '{self.eval.metric}' is not one of: {', '.join(metrics)}")
        return p

