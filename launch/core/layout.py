"""The names inside a run's output_dir, in one place (README, "Outputs of a run")."""

from __future__ import annotations

from pathlib import Path

from bertlaunch.data.corpus.embedded import resolve_model_alias

CONFIG = "config.yaml"  # the resolved config, secrets redacted
METRICS = "metrics.jsonl"  # one JSON line per logged step and per evaluation
CHECKPOINTS = "checkpoints"  # step_NNNNNNNN/ (launch/core/checkpoint.py)
FINAL = "final"  # the Hugging Face model folder of the finished run
EXPORTS = "exports"  # checkpoint.export_at: exports/step_NNNNNNNN/
HF_META = "hf_meta"  # inside a checkpoint: model config.json, tokenizer files, task.json
EVAL_RESULTS = "eval_results.json"  # fine-tuning: best and test scores (written last: the run is finished)
AUDIT = "audit"  # data.audit: which document tokens every trained block held
HEARTBEATS = ".heartbeat"  # the watchdog's per-rank progress files
WANDB = "wandb"  # offline wandb runs


class RunDir:
    """Paths of one output_dir."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.config, self.metrics = self.root / CONFIG, self.root / METRICS
        self.checkpoints, self.final, self.exports = self.root / CHECKPOINTS, self.root / FINAL, self.root / EXPORTS
        self.eval_results, self.audit = self.root / EVAL_RESULTS, self.root / AUDIT
        self.heartbeats, self.wandb = self.root / HEARTBEATS, self.root / WANDB

    def predictions(self, name: str = "") -> Path:
        """predictions.tsv (task.test_file) or predictions_<name>.tsv (task.extra_test)."""
        return self.root / (f"predictions_{name}.tsv" if name else "predictions.tsv")


def resolve_model_dir(path: str) -> str:
    """model.pretrained -> a folder with config.json: a Hugging Face folder, our run's output_dir (its final/),
    an export, or a packaged model's alias (`minilm`)."""
    p = Path(resolve_model_alias(path))
    for cand in (p, p / FINAL):
        if (cand / "config.json").is_file():
            return str(cand)
    raise FileNotFoundError(f"model.pretrained: no config.json in '{path}' (nor in {FINAL}/ below it); "
                            "export a checkpoint first: bertlaunch export CHECKPOINT OUT")
