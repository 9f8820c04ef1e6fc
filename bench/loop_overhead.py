"""Training-loop overhead on the CPU: our full loop (`python launch/pretrain.py`: DeepSpeed engine, data loader
worker, metrics, NaN checks, stop-signal agreement, heartbeat) vs a bare PyTorch loop over the same model,
optimizer and batches, single process.

    python bench/loop_overhead.py [--preset tiny] [--steps 300]

Both sides: the same preset, seed, block size 128, micro-batch 16, fp32, fused AdamW, gradient clipping 1.0
and linear warmup/decay, batches from the same token cache (WikiText-2 valid+test). The bare loop gets its
batches pre-built in memory (no data cost at all), so the overhead measured is everything ours does beyond
forward/backward/step. Steady state: tokens/s over the steps after the first `--warmup`. Writes
bench/results/loop_overhead_<machine>.json.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.env import bench_parser, machine_info, run_pretrain, write_result  # noqa: E402

BLOCK, BATCH, LR, SEED = 128, 16, 1e-3, 0


def ours(cache: str, preset: str, steps: int, warmup: int, tmp: Path) -> dict:
    import yaml

    out = tmp / "ours"
    cfg = {"output_dir": str(out), "model": {"preset": preset},
           "data": {"cache": cache, "block_size": BLOCK, "num_workers": 1},
           "train": {"max_steps": steps, "micro_batch_size": BATCH, "lr": LR, "warmup_steps": 10,
                     "precision": "fp32", "seed": SEED},
           "deepspeed": {"config": "ds_configs/zero0.json"}, "eval": {"every": 0},
           "log": {"every": 10, "wandb": {"mode": "disabled"}, "progress": False},
           "checkpoint": {"every": 0, "at_end": False}}
    (tmp / "ours.yaml").write_text(yaml.safe_dump(cfg))
    run_pretrain(tmp / "ours.yaml")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    rows = [r for r in rows if "loss" in r and "time" in r]
    a = next(r for r in rows if r["step"] >= warmup)
    b = rows[-1]
    return {"tokens_per_s": (b["tokens"] - a["tokens"]) / (b["time"] - a["time"]), "from_step": a["step"],
            "to_step": b["step"], "final_loss": b["loss"]}


def bare(cache: str, preset: str, steps: int, warmup: int) -> dict:
    import torch
    from transformers import get_scheduler

    from bertlaunch.core.config import ModelConfig
    from bertlaunch.core.engine import param_groups
    from bertlaunch.data.mlm.batches import MLMDataset, MLMSettings, initial_states
    from bertlaunch.data.mlm.cache import shard_names_and_sizes
    from bertlaunch.data.tokenize import load_spec
    from bertlaunch.model.build import load_mlm
    from bertlaunch.model.mlm import MaskedLM

    spec = load_spec("bert-base-uncased")
    _, sizes = shard_names_and_sizes(cache)
    s = MLMSettings(block_size=BLOCK, micro_batch_size=BATCH, mlm_probability=0.15, whole_word_masking=False,
                    seed=SEED)
    it = iter(MLMDataset(None, sizes, spec, s, initial_states(0, 1, 1), cache=cache))
    batches = [next(it) for _ in range(steps)]  # in memory before the clock starts
    torch.manual_seed(SEED)
    hf, _ = load_mlm(ModelConfig(preset=preset), spec, None)
    model = MaskedLM(hf, sparse_head=True).train()
    opt = torch.optim.AdamW(param_groups(model, 0.01), lr=LR, fused=True)
    sched = get_scheduler("linear", opt, num_warmup_steps=10, num_training_steps=steps)
    t0 = tokens = 0
    for step, batch in enumerate(batches, 1):
        if step == warmup + 1:
            t0, tokens = time.perf_counter(), 0
        loss = model(input_ids=batch["input_ids"], mlm_rows=batch["mlm_rows"], mlm_targets=batch["mlm_targets"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        tokens += batch["meta"]["n_real"]
    return {"tokens_per_s": tokens / (time.perf_counter() - t0), "final_loss": float(loss.detach())}


def main() -> None:
    ap = bench_parser(__doc__)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=40)
    args = ap.parse_args()
    from bertlaunch.data.mlm.cache_build import prepare

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        prepare(args.files, "bert-base-uncased", str(tmp / "cache"), workers=2, mode="line")
        # alternate, twice each, so that a drift in machine load hits both sides alike
        runs = {"bare": [], "ours": []}
        for _ in range(2):
            runs["bare"].append(bare(str(tmp / "cache"), args.preset, args.steps, args.warmup))
            runs["ours"].append(ours(str(tmp / "cache"), args.preset, args.steps, args.warmup, tmp))
    best = {k: max(r["tokens_per_s"] for r in v) for k, v in runs.items()}
    res = {"machine": machine_info(), "command": " ".join(sys.argv), "preset": args.preset, "steps": args.steps,
           "warmup": args.warmup, "block_size": BLOCK, "micro_batch": BATCH, "runs": runs,
           "summary": {"bare_tokens_per_s": best["bare"], "ours_tokens_per_s": best["ours"],
                       "overhead": 1 - best["ours"] / best["bare"], "target_overhead": 0.05}}
    write_result(res, "loop_overhead", args.out)


if __name__ == "__main__":
    main()
