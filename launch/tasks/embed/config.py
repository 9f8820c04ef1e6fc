"""The embedding-task config: the shared sections (launch/core/config.py) plus the rows, pooling, loss and retrieval
evaluation (`task`). The names train_file, query, positive, negative, pooling, eval_dir and eval_split are fixed:
scripts rely on them."""

from __future__ import annotations

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
from bertlaunch.data.corpus.storage import is_remote


@dataclass
class EmbedTaskConfig:
    train_file: str | None = None
    """Training rows: .jsonl, .tsv, .csv or .parquet, a local path or an fsspec URL (s3://..., https://...), one
    (query, positive[, hard negative]) per row."""
    format: Literal["auto", "tsv", "csv", "jsonl", "parquet"] = "auto"
    """Table format (auto: from the file extension)."""
    query: str = "query"
    """Column of the query (the anchor)."""
    positive: str = "positive"
    """Column of the positive passage."""
    negative: str | None = None
    """Column of a hard negative passage (null: in-batch negatives only)."""
    max_train_examples: int | None = None
    """Train on the first N rows only (quick runs); None: all of them."""
    max_length: int = 128
    """Truncate every text (query and passages) to this many tokens; saved as the export's max_seq_length."""
    pooling: Literal["mean", "cls"] = "mean"
    """Sentence embedding: mean of the token vectors (under the attention mask) or the [CLS] token's vector."""
    normalize: bool = True
    """L2-normalise the embeddings (the similarity is then the cosine); false: raw embeddings, dot product."""
    temperature: float = 0.05
    """InfoNCE temperature: the loss is cross-entropy over similarity / temperature (sentence-transformers'
    MultipleNegativesRankingLoss scale 20 = temperature 0.05)."""
    unpad: bool | None = None
    """Pad-free: each micro-batch's texts packed end to end, so every linear layer runs on real tokens only, and
    attention run in task.length_groups groups of similar lengths, each padded to its own longest inside the
    attention only (model/unpadded.py). null: pad-free where the model allows it (a BertModel with absolute
    positions: BERT, MiniLM; and model.compile=false), the padded groups otherwise; true: pad-free, or an error
    saying why not; false: the padded groups. The embeddings are the same to rounding either way."""
    length_groups: int = 4
    """Each micro-batch's texts (queries, positives and negatives together) are sorted by length and cut into this
    many groups. Padded (task.unpad off): each group is one encoder pass padded to its own longest text. Pad-free:
    the groups are the attention's only. Every text is encoded alone either way (the loss is the same to rounding;
    dropout draws differ). 1: every text padded to the micro-batch's longest."""
    grad_cache: bool = False
    """GradCache: embed the whole global batch without gradients in micro-batches, take the loss over all of it,
    then recompute each micro-batch with gradients (same loss and gradients as one big batch, about a third more
    compute): the negatives are the global batch at any train.micro_batch_size. false: the negatives are the
    micro-batch on every rank (micro x world), which is the global batch when there is no accumulation."""
    eval_dir: str | None = None
    """A BEIR folder (corpus.jsonl, queries.jsonl, qrels/<split>.tsv) scored at every evaluation: nDCG@10,
    Recall@100 and MRR@10; the best checkpoint is the one with the highest nDCG@10. None: no evaluation."""
    eval_split: str = "test"
    """The qrels split of task.eval_dir."""


@dataclass
class EmbedTrainConfig(TrainConfig):
    max_steps: int | None = None
    """Optimizer steps (overrides train.epochs when set)."""
    epochs: float = 1.0
    """Passes over the training rows."""
    micro_batch_size: int = 32
    """Rows per rank per forward pass, at most (a memory setting: the largest that divides the global batch's
    share of one rank is used). Without task.grad_cache it also bounds the in-batch negatives (micro x world)."""
    global_batch_size: int | None = 32
    """Rows per optimizer step over all ranks: the recipe, the same at any GPU count."""
    lr: float = 5e-5
    """Peak learning rate (sentence-transformers' default)."""
    weight_decay: float = 0.0
    """AdamW weight decay (sentence-transformers' default is 0)."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    warmup_ratio: float = 0.1
    """Warmup as a fraction of all steps, used when train.warmup_steps is 0."""


@dataclass
class EmbedEvalConfig(EvalConfig):
    every: int = 0
    """Evaluate every N steps (0: at the end of every epoch)."""
    save_best: bool = True
    """Keep the best checkpoint by nDCG@10 (protected from keep_last) and make output_dir/final from it."""
    micro_batch_size: int | None = 128
    """Texts per rank per forward pass when encoding the corpus and the queries."""


@dataclass
class EmbedConfig:
    output_dir: str = REQUIRED
    """Where config.yaml, metrics.jsonl, eval_results.json, checkpoints/ and final/ (a sentence-transformers
    folder) go."""
    tokenizer: str | None = None
    """Tokenizer folder (None: the one saved with model.pretrained)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """model.pretrained: a sentence-transformers or Hugging Face folder (our pretraining output_dir or an export)."""
    task: EmbedTaskConfig = field(default_factory=EmbedTaskConfig)
    """Rows, pooling, loss and retrieval evaluation."""
    train: EmbedTrainConfig = field(default_factory=EmbedTrainConfig)
    """Optimization."""
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    """DeepSpeed engine."""
    eval: EmbedEvalConfig = field(default_factory=EmbedEvalConfig)
    """Retrieval evaluation and best checkpoint."""
    log: LogConfig = field(default_factory=LogConfig)
    """Metrics, progress bar and wandb."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoints and resume."""

    def validate(self) -> list[str]:
        p = validate_common(self)
        t = self.task
        if self.model.preset and not self.tokenizer:
            p.append("model.preset needs an explicit tokenizer (e.g. tokenizer=bert-base-uncased)")
        if not t.train_file:
            p.append("no training data: set task.train_file (a .jsonl/.tsv/.csv/.parquet table of (query, positive"
                     "[, negative]) rows)")
        elif not is_remote(t.train_file) and not Path(t.train_file).is_file():
            p.append(f"task.train_file: '{t.train_file}' does not exist")
        if t.eval_dir and not is_remote(t.eval_dir) and not Path(t.eval_dir).is_dir():
            p.append(f"task.eval_dir: '{t.eval_dir}' is not a folder (a BEIR folder: corpus.jsonl, queries.jsonl, "
                     "qrels/<split>.tsv)")
        if len({t.query, t.positive, t.negative} - {None}) < 2 + bool(t.negative):
            p.append(f"task.query, task.positive and task.negative must name different columns, got {t.query!r}, "
                     f"{t.positive!r}, {t.negative!r}")
        if t.max_train_examples is not None and t.max_train_examples < 1:
            p.append(f"task.max_train_examples must be >= 1 (or null for all rows), got {t.max_train_examples}")
        if t.max_length is not None and t.max_length < 4:
            p.append(f"task.max_length must be >= 4, got {t.max_length}")
        if t.length_groups is not None and t.length_groups < 1:
            p.append(f"task.length_groups must be >= 1 (1: no grouping), got {t.length_groups}")
        if t.temperature is not None and t.temperature <= 0:
            p.append(f"task.temperature must be > 0, got {t.temperature}")
        if self.train.epochs is not None and self.train.epochs <= 0 and not self.train.max_steps:
            p.append(f"train.epochs must be > 0, got {self.train.epochs}")
        if self.eval.micro_batch_size is not None and self.eval.micro_batch_size < 1:
            p.append(f"eval.micro_batch_size must be >= 1, got {self.eval.micro_batch_size}")
        return p
