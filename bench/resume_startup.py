"""Resume start-up cost vs the step reached: resuming late in the corpus must cost no more than resuming early
(the data position is seeked, never replayed).

    python bench/resume_startup.py [--early 10] [--late 600]

Trains a tiny BERT by streaming WikiText-2 (valid+test, x4: ~2.3M tokens) to step `--early` and on to step
`--late` (~1.2M tokens in), keeping both checkpoints; then, alternating, resumes from each into a fresh
output dir and trains exactly one more step, timing the whole process (imports, DeepSpeed set-up, checkpoint
load, data seek, one step). Writes bench/results/resume_startup_<machine>.json.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.env import bench_parser, machine_info, repeat_corpus, run_pretrain, write_result  # noqa: E402


def main() -> None:
    ap = bench_parser(__doc__)
    ap.add_argument("--repeat", type=int, default=4)
    ap.add_argument("--early", type=int, default=10)
    ap.add_argument("--late", type=int, default=600)
    ap.add_argument("--trials", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        corpus = repeat_corpus(args.files, args.repeat, tmp)
        cfg = tmp / "run.yaml"
        cfg.write_text(yaml.safe_dump({
            "output_dir": str(tmp / "run"), "model": {"preset": "tiny"},
            "data": {"train_files": [str(corpus)], "block_size": 128, "num_workers": 1, "txt_documents": "line"},
            "train": {"max_steps": args.early, "micro_batch_size": 16, "lr": 1e-3, "warmup_steps": 10,
                      "precision": "fp32"},
            "deepspeed": {"config": "ds_configs/zero0.json"}, "eval": {"every": 0},
            "log": {"every": 50, "progress": False, "wandb": {"mode": "disabled"}},
            "checkpoint": {"every": 0, "keep_last": 5}}))
        train_s = run_pretrain(cfg) + run_pretrain(cfg, f"train.max_steps={args.late}")
        ckpts = {"early": tmp / "run" / "checkpoints" / f"step_{args.early:08d}",
                 "late": tmp / "run" / "checkpoints" / f"step_{args.late:08d}"}
        meta = ckpts["late"] / "trainer.json"
        trainer = json.loads(meta.read_text()) if meta.is_file() else {}
        times = {"early": [], "late": []}
        for trial in range(args.trials):
            for name, ckpt in ckpts.items():
                step = args.early if name == "early" else args.late
                times[name].append(run_pretrain(cfg, f"train.resume={ckpt}", f"train.max_steps={step + 1}",
                                            f"output_dir={tmp / f'{name}_{trial}'}", "checkpoint.at_end=false"))
    med = {k: statistics.median(v) for k, v in times.items()}
    res = {"machine": machine_info(), "command": " ".join(sys.argv), "early_step": args.early,
           "late_step": args.late, "tokens_at_late_step": args.late * 16 * 128, "training_s": train_s,
           "late_checkpoint_state": trainer.get("state"), "resume_one_step_s": times,
           "summary": {"early_median_s": med["early"], "late_median_s": med["late"],
                       "late_over_early": med["late"] / med["early"], "target_late_over_early": "<= ~1 (noise)"}}
    write_result(res, "resume_startup", args.out)


if __name__ == "__main__":
    main()
