"""The pretraining config: the shared sections (launch/core/config.py) plus the corpus (`data`)."""

from __future__ import annotations

import glob
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

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
from bertlaunch.core.downstream import DownstreamConfig, validate_downstream
from bertlaunch.core.plan import PhaseSpec
from bertlaunch.data.corpus.storage import configure, is_remote
from bertlaunch.tasks.glue.downstream import suite_problems

DEFAULT_STEPS = 1000  # train.max_steps when no length is given


@dataclass
class SourceConfig:
    name: str = REQUIRED
    """Short name: the key of tokens_by_source / epoch_by_source in metrics.jsonl and of eval_loss/<name>."""
    files: list[str] = field(default_factory=list)
    """Paths, globs or URLs of this source's files (same formats as data.train_files)."""
    weight: float = 1.0
    """Relative share of blocks drawn from this source (normalised over all sources; > 0)."""
    text_field: str | None = None
    """Text field of its .jsonl/.parquet files (None: data.text_field)."""
    txt_documents: Literal["blank_line", "line"] | None = None
    """Document split of its .txt files (None: data.txt_documents)."""
    eval_files: list[str] = field(default_factory=list)
    """Held-out files of this source, evaluated on their own as eval_loss/<name>."""


@dataclass
class DataConfig:
    train_files: list[str] = field(default_factory=list)
    """Paths, globs or fsspec URLs (s3://, gs://, https://, hf://datasets/...) of .txt / .jsonl files, plain
    or compressed (.gz/.zst/.bz2/.xz), or .parquet; or `embedded:pydoc` (text that ships with Python)."""
    sources: list[SourceConfig] = field(default_factory=list)
    """A weighted mixture instead of train_files: [{name, files, weight}, ...]. Each block comes from one
    source, chosen by a deterministic function of (seed, block index), so the shares hold at any world size;
    each source is sharded, read and re-read (epochs) on its own."""
    eval_files: list[str] = field(default_factory=list)
    """Held-out files, same formats; evaluated in full every eval.every steps."""
    storage_options: dict[str, Any] = field(default_factory=dict)
    """Passed to fsspec for remote files, e.g. {endpoint_url: ..., key: ..., secret: ...} for S3 (default:
    the standard environment: AWS_*, GOOGLE_APPLICATION_CREDENTIALS, HF_TOKEN). Redacted in config.yaml."""
    io_retries: int = 5
    """Attempts for a remote read that fails with a transient network error (backoff 1, 2, 4, ... s)."""
    txt_documents: Literal["blank_line", "line"] = "blank_line"
    """How .txt files split into documents: blank_line = a run of non-empty lines separated by one or
    more blank lines (WikiText paragraphs, books); line = every non-empty line is a document."""
    text_field: str = "text"
    """Field holding the text in .jsonl records and the column in .parquet files."""
    cache: str | None = None
    """A token cache folder from `bertlaunch prepare`; when set it is read instead of train_files (the text
    settings txt_documents, text_field, max_chunk_bytes and encoding_errors then apply to eval_files only: the
    cache holds the tokens made with the settings it was prepared with)."""
    block_size: int = 128
    """Tokens per packed block (sequence length)."""
    mlm_probability: float = 0.15
    """Fraction of (non-special) tokens selected for MLM; of those 80% -> [MASK], 10% random, 10% kept
    (train.phases[i].mlm_probability sets it per phase)."""
    eval_mlm_probability: float | None = None
    """Masking rate of the evaluation (None: data.mlm_probability). ModernBERT trains at 30% and evaluates at
    15%, so that runs with other rates compare."""
    isolate_documents: bool = False
    """In a packed block each document attends only to itself and its positions restart at 0 (RoPE or learned
    absolute positions). Blocks, data order and masks stay as without it. CPU: a block-diagonal attention mask;
    GPUs: variable-length FlashAttention over the documents (model/packed.py). BERT, RoBERTa, ELECTRA and
    ModernBERT models."""
    whole_word_masking: bool = False
    """Select whole words (all their ## pieces) instead of single tokens."""
    num_workers: int = 2
    """Dataloader worker processes per rank (0: read and tokenize in the training process)."""
    last_block: Literal["pad", "drop"] = "pad"
    """The one short block at the end of each stream's epoch: pad it (counted as pad tokens) or drop it."""
    encoding_errors: Literal["strict", "replace"] = "strict"
    """Non-UTF-8 bytes: strict = stop with the file and byte offset; replace = U+FFFD, counted in metrics."""
    max_chunk_bytes: int = 1 << 20
    """Longer lines are read and tokenized in pieces of at most this many bytes, cut at whitespace."""
    audit: bool = False
    """Record which document tokens every trained block held (output_dir/audit/), for exactly-once checks."""


def use_storage(d: DataConfig) -> None:
    """Hand data.storage_options / io_retries to data/corpus/storage.py for this process (and its forked workers)."""
    configure(d.storage_options, d.io_retries)


@dataclass
class PhaseConfig:
    block_size: int = REQUIRED
    """Tokens per packed block in this phase."""
    steps: int | None = None
    """Optimizer steps of this phase (set steps or tokens)."""
    tokens: int | None = None
    """Token slots of this phase (global batch x block_size per step), instead of steps."""
    micro_batch_size: int | None = None
    """Sequences per rank per forward pass in this phase (None: train.micro_batch_size)."""
    global_batch_size: int | None = None
    """Sequences per optimizer step in this phase (None: train.global_batch_size)."""
    mlm_probability: float | None = None
    """Masking rate in this phase (None: data.mlm_probability)."""
    rope_theta: float | None = None
    """RoPE base of the global-attention layers from this phase on, e.g. 160000 for a context extension as
    ModernBERT's (None: as before; RoPE models only)."""


@dataclass
class BatchWarmupConfig:
    tokens: int | None = None
    """Grow the global batch over this many token slots at the start of the run (null: no batch warmup)."""
    start: int | None = None
    """The global batch it starts from (it ends at the first phase's global batch size)."""
    stages: int = 8
    """Steps of the growth: equal token shares, batch sizes evenly spaced from start (each one a phase)."""
    multiple_of: int = 64
    """Each stage's global batch is rounded down to a multiple of this (so that the rank counts that divide it
    share every stage evenly)."""


@dataclass
class PretrainModelConfig(ModelConfig):
    sparse_mlm_head: bool = True
    """Run the MLM head only on masked positions: same loss, about 15% fewer FLOPs per token."""


@dataclass
class PretrainEvalConfig(EvalConfig):
    max_batches: int | None = None
    """Cap on eval batches per rank (None: the whole eval set)."""
    downstream: DownstreamConfig = field(default_factory=DownstreamConfig)
    """Downstream scores during pretraining: every checkpoint.export_at export is fine-tuned on GLUE tasks and/or
    scored on retrieval sets by jobs that run beside the training (a child process or an sbatch job); the scores
    go into metrics.jsonl and wandb against tokens."""


@dataclass
class PretrainTrainConfig(TrainConfig):
    max_steps: int | None = None
    """Optimizer steps to train for (null: 1000). Set one length: train.max_steps, train.max_tokens or
    train.phases; with train.time_budget_h it is the cap (and the schedule's reference length)."""
    max_tokens: int | None = None
    """Train on this many token slots (global batch x data.block_size per step); sets the step count
    instead of train.max_steps, so the budget stays the same at any number of GPUs."""
    warmup_tokens: int | None = None
    """Warmup in token slots instead of train.warmup_steps / warmup_ratio, counted through the phases in order
    (a warmup longer than the first phase goes on into the next)."""
    batch_warmup: BatchWarmupConfig = field(default_factory=BatchWarmupConfig)
    """Batch-size warmup (ModernBERT: 768 -> 4608 sequences over 50B tokens): the first phase's first `tokens`
    run as `stages` phases of growing global batch, so the loop, the data and resume treat them as phases."""
    phases: list[PhaseConfig] = field(default_factory=list)
    """Sequence-length phases run one after another in one run, e.g. [{tokens: 30e9, block_size: 128},
    {tokens: 3e9, block_size: 512, micro_batch_size: 16}]: the same optimizer, one schedule over all of them,
    and the data read on from where the previous phase stopped (each document still once per epoch). The
    run's steps are the phases' sum (train.max_steps / max_tokens do not apply); data.block_size stays
    the evaluation's block length."""


@dataclass
class PretrainConfig:
    output_dir: str = REQUIRED
    """Where config.yaml, metrics.jsonl, checkpoints/ and final/ go. $VAR / ${VAR} are expanded in each process
    (node-local scratch, e.g. /scratch/$SLURM_JOB_ID/run; checkpoint.remote then holds every node's files)."""
    tokenizer: str = "bert-base-uncased"
    """Tokenizer folder or tokenizer.json; bert-base-uncased resolves to an offline copy of its vocab."""
    model: PretrainModelConfig = field(default_factory=PretrainModelConfig)
    """Model architecture or pretrained weights."""
    data: DataConfig = field(default_factory=DataConfig)
    """Corpus, packing and masking."""
    train: PretrainTrainConfig = field(default_factory=PretrainTrainConfig)
    """Optimization."""
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    """DeepSpeed engine."""
    eval: PretrainEvalConfig = field(default_factory=PretrainEvalConfig)
    """Held-out evaluation."""
    log: LogConfig = field(default_factory=LogConfig)
    """Metrics, progress bar and wandb."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoints and resume."""

    def phase_specs(self) -> list[PhaseSpec]:
        """The run's phases for the plan: train.phases, or the whole run as one phase; the first one split into
        train.batch_warmup's stages when set."""
        t = self.train
        if not t.phases:
            steps = t.max_steps if t.max_steps is not None else (None if t.max_tokens else DEFAULT_STEPS)
            specs = [PhaseSpec(steps, t.max_tokens, self.data.block_size, settings={})]
        else:
            specs, rope = [], None
            for i, ph in enumerate(t.phases):
                rope = ph.rope_theta or rope  # a RoPE base holds until a later phase changes it
                settings = {k: v for k, v in (("mlm_probability", ph.mlm_probability), ("rope_theta", rope),
                                              ("key", f"train.phases[{i}]")) if v}
                specs.append(PhaseSpec(ph.steps, ph.tokens, ph.block_size, ph.micro_batch_size, ph.global_batch_size,
                                       settings))
        return batch_warmup(specs, t.batch_warmup, t.global_batch_size) + specs[1:]

    def longest(self) -> tuple[str, int]:
        """(key, length) of the longest sequence any phase (or the evaluation) feeds the model."""
        lengths = [("data.block_size", self.data.block_size or 0)] + [
            (f"train.phases[{i}].block_size", ph.block_size or 0) for i, ph in enumerate(self.train.phases)]
        return max(lengths, key=lambda kv: kv[1])

    def validate(self) -> list[str]:
        p = validate_common(self)
        d = self.data
        if not (d.train_files or d.cache or d.sources):
            p.append("no training data: set data.train_files (paths or globs of .txt/.jsonl), data.sources (a "
                     "weighted mixture) or data.cache (a token cache from bertlaunch prepare)")
        if d.sources and (d.train_files or d.cache):
            p.append("data.sources replaces data.train_files" + (" and data.cache" if d.cache else "")
                     + ": set one of them (train_files is the one-source shorthand)")
        patterns = [(f"data.{key}", x) for key in ("train_files", "eval_files") for x in getattr(d, key) or []]
        names = [src.name for src in d.sources]
        for i, src in enumerate(d.sources):
            key = f"data.sources[{i}]" + (f" ({src.name})" if src.name else "")
            if not src.files:
                p.append(f"{key}: no files; list its paths, globs or URLs under files")
            if src.weight is not None and not src.weight > 0:
                p.append(f"{key}: weight must be > 0, got {src.weight} (drop the source to leave it out)")
            if src.name and names.count(src.name) > 1:
                p.append(f"{key}: the name '{src.name}' is used by more than one source; names must be unique")
            patterns += [(f"{key}.{k}", x) for k in ("files", "eval_files") for x in getattr(src, k) or []]
        for key, pattern in patterns:
            if pattern and not pattern.startswith("embedded:") and not is_remote(pattern) and not glob.glob(pattern):
                p.append(f"{key}: '{pattern}' matches no file (check the path; globs like "
                         "'corpus/*.txt' are allowed)")
        if d.io_retries is not None and d.io_retries < 1:
            p.append(f"data.io_retries must be >= 1, got {d.io_retries}")
        if d.cache and not Path(d.cache, "meta.json").is_file():
            p.append(f"data.cache: '{d.cache}' is not a finished token cache (no meta.json); build it with "
                     "bertlaunch prepare --config <this config> --out <folder>")
        if d.block_size is not None and not 8 <= d.block_size:
            p.append(f"data.block_size must be at least 8, got {d.block_size}")
        if d.mlm_probability is not None and not 0.0 < d.mlm_probability < 1.0:
            p.append(f"data.mlm_probability must be in (0, 1), got {d.mlm_probability}")
        if d.num_workers is not None and d.num_workers < 0:
            p.append(f"data.num_workers must be >= 0, got {d.num_workers}")
        t = self.train
        for key in ("max_tokens", "warmup_tokens"):
            if getattr(t, key) is not None and getattr(t, key) < 1:
                p.append(f"train.{key} must be >= 1 (or null), got {getattr(t, key)}")
        for i, ph in enumerate(t.phases):
            if (ph.steps is None) == (ph.tokens is None):
                p.append(f"train.phases[{i}]: set exactly one of steps or tokens")
            for key in ("steps", "tokens", "micro_batch_size", "global_batch_size"):
                if getattr(ph, key) is not None and getattr(ph, key) < 1:
                    p.append(f"train.phases[{i}].{key} must be >= 1, got {getattr(ph, key)}")
            if ph.block_size is not None and ph.block_size < 8:
                p.append(f"train.phases[{i}].block_size must be at least 8, got {ph.block_size}")
        for i, ph in enumerate(t.phases):
            if ph.mlm_probability is not None and not 0.0 < ph.mlm_probability < 1.0:
                p.append(f"train.phases[{i}].mlm_probability must be in (0, 1), got {ph.mlm_probability}")
            if ph.rope_theta is not None and ph.rope_theta <= 0:
                p.append(f"train.phases[{i}].rope_theta must be > 0, got {ph.rope_theta}")
        if d.eval_mlm_probability is not None and not 0.0 < d.eval_mlm_probability < 1.0:
            p.append(f"data.eval_mlm_probability must be in (0, 1), got {d.eval_mlm_probability}")
        p += check_batch_warmup(t, self.data.block_size)
        if t.phases and t.max_tokens:
            p.append("train.max_tokens does not apply with train.phases (each phase has its steps or tokens)")
        if t.phases and t.max_steps:
            p.append("train.max_steps does not apply with train.phases (each phase has its steps or tokens)")
        if t.max_steps and t.max_tokens:
            p.append("set one of train.max_steps or train.max_tokens (a token budget sets the step count: "
                     "global batch x block size per step)")
        warmups = [k for k, on in (("warmup_steps", t.warmup_steps), ("warmup_ratio", t.warmup_ratio),
                                   ("warmup_tokens", t.warmup_tokens)) if on]
        if len(warmups) > 1:
            p.append(f"set one warmup, not {' and '.join('train.' + k for k in warmups)}")
        if d.max_chunk_bytes is not None and d.max_chunk_bytes < 1024:
            p.append(f"data.max_chunk_bytes must be >= 1024, got {d.max_chunk_bytes}")
        return p + validate_downstream(self.eval.downstream, self.checkpoint.export_at or []) + suite_problems(
            self.eval.downstream.glue)


def first_phase(t: PretrainTrainConfig, block_size: int) -> tuple[int | None, int | None, int, int | None]:
    """(steps, tokens, block size, global batch) of the run's first phase as configured."""
    if t.phases:
        ph = t.phases[0]
        return ph.steps, ph.tokens, ph.block_size, ph.global_batch_size or t.global_batch_size
    steps = t.max_steps if t.max_steps is not None else (None if t.max_tokens else DEFAULT_STEPS)
    return steps, t.max_tokens, block_size, t.global_batch_size


def check_batch_warmup(t: PretrainTrainConfig, block_size: int) -> list[str]:
    w, p = t.batch_warmup, []
    if w.tokens is None:
        return [] if w.start is None else ["train.batch_warmup.start needs train.batch_warmup.tokens (the token "
                                           "slots over which the batch grows)"]
    steps, tokens, block, final = first_phase(t, block_size)
    if w.tokens < 1 or (w.stages or 0) < 1 or (w.multiple_of or 0) < 1:
        p.append(f"train.batch_warmup: tokens, stages and multiple_of must be >= 1, got {w.tokens}, {w.stages}, "
                 f"{w.multiple_of}")
    elif final is None or w.start is None or not 1 <= w.start < final:
        p.append(f"train.batch_warmup.start must be >= 1 and below the first phase's global batch size ({final}: "
                 f"set train.global_batch_size), got {w.start}")
    elif block and (tokens or (steps or 0) * final * block) <= w.tokens:
        p.append(f"train.batch_warmup.tokens={w.tokens} must be below the first phase's token slots "
                 f"({tokens or (steps or 0) * final * block})")
    elif w.start < w.multiple_of:
        p.append(f"train.batch_warmup.start={w.start} is below train.batch_warmup.multiple_of={w.multiple_of}: "
                 "lower multiple_of")
    return p


def batch_warmup(specs: list[PhaseSpec], w: BatchWarmupConfig, global_batch: int | None) -> list[PhaseSpec]:
    """The first phase as train.batch_warmup's stages + the rest of it at its own batch (no warmup: itself).
    Stage i of n has the global batch start + (final - start) * i / n, rounded down to multiple_of, and
    tokens / n token slots."""
    first = specs[0]
    final = first.global_batch_size or global_batch
    if w.tokens is None or w.start is None or final is None or not w.start < final:
        return specs[:1]
    stages = []
    for i in range(w.stages):
        size = max(w.start + (final - w.start) * i // w.stages, w.start) // w.multiple_of * w.multiple_of
        settings = {**first.settings, "stage": f"batch warmup {i + 1}/{w.stages}",
                    "key": f"train.batch_warmup (stage {i + 1})"}
        stages.append(PhaseSpec(None, math.ceil(w.tokens / w.stages), first.block_size, first.micro_batch_size,
                                size, settings))
    total = first.tokens or first.steps * final * first.block_size
    rest = PhaseSpec(None, total - w.tokens, first.block_size, first.micro_batch_size, final, first.settings)
    return stages + [rest]
