"""Metrics on rank 0: metrics.jsonl (always), console / progress bar, wandb (launch/core/tracking.py).

FLOPs model for MFU (per token, training = 3 x forward: backward costs twice the forward):
  per layer   8 H^2 (Q, K, V, output projections) + 4 H I (feed-forward) + 4 S H (QK^T and AV)
  MLM head    2 H^2 + 2 H V  per row that goes through it: every position with a dense head, only the
              masked positions with model.sparse_mlm_head (what is really computed is what we count)
  excluded    embeddings (lookups, no matmul), LayerNorm / softmax / GELU (not matmul FLOPs)
For BERT-base (H 768, I 3072, L 12, V 30522, S 128) a dense head gives 668 MFLOP/token; a sparse head
at 15% masking 545 MFLOP/token. MFU = achieved FLOP/s / (peak FLOP/s of one device x devices).
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from bertlaunch.core.layout import RunDir

# Dense peak TFLOP/s of one device by (name fragment, precision); fp32 on GPUs means TF32 tensor cores.
PEAK_TFLOPS = [
    ("H200", {"bf16": 989.4, "fp16": 989.4, "fp32": 494.7}),
    ("H100", {"bf16": 989.4, "fp16": 989.4, "fp32": 494.7}),
    ("A100", {"bf16": 312.0, "fp16": 312.0, "fp32": 156.0}),
    ("L40S", {"bf16": 362.0, "fp16": 362.0, "fp32": 183.0}),
    ("A10", {"bf16": 125.0, "fp16": 125.0, "fp32": 62.5}),
    ("L4", {"bf16": 121.0, "fp16": 121.0, "fp32": 60.0}),
    ("V100", {"fp16": 125.0, "fp32": 15.7}),
]


def peak_flops(precision: str, override_tflops: float | None = None) -> float | None:
    """Peak FLOP/s of the current device, or None when unknown (CPU without an override)."""
    if override_tflops:
        return override_tflops * 1e12
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for frag, table in PEAK_TFLOPS:
        if frag in name:
            return table.get(precision, table.get("fp32")) * 1e12
    return None


def encoder_flops(*, layers: int, hidden: int, intermediate: int, seq: int, vocab: int, tokens: int,
                  head_rows: int, num_labels: int | None = None) -> float:
    """Training FLOPs for `tokens` positions of sequence length `seq` and `head_rows` rows through the
    MLM head (or, with num_labels, a classifier on one pooled row per sequence)."""
    per_token = layers * (8 * hidden * hidden + 4 * hidden * intermediate + 4 * seq * hidden)
    if num_labels is None:
        head = head_rows * (2 * hidden * hidden + 2 * hidden * vocab)
    else:  # pooler dense + classifier on [CLS]
        head = head_rows * (2 * hidden * hidden + 2 * hidden * num_labels)
    return 3.0 * (tokens * per_token + head)


def arch_of(config) -> dict:
    return {"layers": config.num_hidden_layers, "hidden": config.hidden_size,
            "intermediate": config.intermediate_size, "vocab": config.vocab_size}


class MetricsLog:
    """Rank 0 writes; other ranks hold a no-op instance."""

    def __init__(self, output_dir: str, enabled: bool, total_steps: int, start_step: int,
                 progress: bool = True, tracker=None):
        self.enabled, self.total, self.tracker = enabled, total_steps, tracker
        self.path = RunDir(output_dir).metrics
        self.bar, self.refreshed = None, 0.0
        self.t_start, self.start_step = time.time(), start_step
        self.previous_max_step = 0
        if not enabled:
            return
        # a resumed run rewrites the steps after its checkpoint
        self.previous_max_step = truncate_after(self.path, start_step)
        self.file = open(self.path, "a", buffering=1)
        if progress and sys.stdout.isatty():
            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        record = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self.file.write(json.dumps(record) + "\n")
        if self.tracker is not None:
            self.tracker.log(record)

    def step(self, step: int, record: dict | None = None) -> None:
        """Advance the bar; with a record, also print a plain line when there is no bar."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.n = step
            if record:
                self.bar.set_postfix({k: _short(record[k]) for k in ("loss", "tokens_per_s", "lr")
                                      if k in record and record[k] is not None}, refresh=False)
            now = time.time()
            if record or now - self.refreshed >= 0.5:  # terminal writes at most twice a second between logs
                self.bar.refresh()
                self.refreshed = now
        elif record:
            done = max(step - self.start_step, 1)
            eta = (time.time() - self.t_start) / done * (self.total - step)
            parts = [f"{k}={_short(v)}" for k, v in record.items() if k not in ("step", "time")]
            print(f"step {step}/{self.total} " + " ".join(parts) + f" eta={_hms(eta)}", flush=True)

    def info(self, msg: str) -> None:
        if self.enabled:
            (self.bar.write if self.bar is not None else print)(msg)
            sys.stdout.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        self.file.close()
        if self.tracker is not None:
            self.tracker.finish()


class SpikeDetector:
    """Warns when a logged loss jumps far above its recent exponential mean (a sign of divergence)."""

    def __init__(self, alpha: float = 0.1, sigmas: float = 4.0, warmup: int = 5):
        self.alpha, self.sigmas, self.warmup = alpha, sigmas, warmup
        self.mean, self.var, self.n = 0.0, 0.0, 0

    def is_spike(self, loss: float) -> bool:
        if not math.isfinite(loss):
            return False
        spike = self.n >= self.warmup and loss > self.mean + self.sigmas * math.sqrt(self.var) and \
            loss > 1.2 * self.mean
        if not spike:  # spikes do not pollute the running statistics
            d = loss - self.mean if self.n else 0.0
            self.mean = loss if not self.n else self.mean + self.alpha * d
            self.var = (1 - self.alpha) * (self.var + self.alpha * d * d)
            self.n += 1
        return spike


def truncate_after(path: Path, step: int) -> int:
    """Drop metrics lines of steps after `step` (written by a run that died before its next checkpoint);
    returns the highest step the file had."""
    if not path.is_file():
        return 0
    keep, highest = [], 0
    for line in path.read_text().splitlines():
        try:
            s = json.loads(line).get("step", 0)
        except json.JSONDecodeError:
            continue  # a line cut by the kill
        highest = max(highest, s)
        if s <= step:
            keep.append(line)
    path.write_text("".join(k + "\n" for k in keep))
    return highest


def _short(v):
    if isinstance(v, float):
        return f"{v:.4g}"
    return v


def _hms(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
