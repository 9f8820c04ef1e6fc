"""Quality and speed gate of the embedding task: all-MiniLM-L6-v2 fine-tuned on MRPC's paraphrase pairs by
ours and by sentence-transformers' own trainer, side by side (alternating rounds, one process each).

    python bench/embed_minilm.py [--rounds 3] [--mrpc ../shared/data/mrpc] [--gather-steps 20]

Data (bertlaunch.tools.pair_retrieval): 2474 positive train pairs (query = sentence 1, positive = sentence 2);
scored on MRPC test: 1147 queries, each to find its paraphrase among 1698 second sentences.
- ours: `python launch/embed.py --config configs/embed_minilm.yaml` (InfoNCE, temperature 0.05, mean pooling,
  normalised; pad-free, the linear layers multiplied by oneDNN: model.cpu_linear=onednn), 1 rank;
- ours_torch_linear: the same with model.cpu_linear=torch (torch's default products, as the anchor's): what the
  pad-free encoding alone gives;
- anchor: SentenceTransformerTrainer + MultipleNegativesRankingLoss (scale 20 = temperature 0.05);
both: seed 42, batch 32, 1 epoch, lr 5e-5, 10% warmup then linear decay, AdamW (weight decay 0), fp32, no
evaluation during training. Wall time = the whole training process (start-up, model load, training, save); train_s
= its training loop alone (ours: metrics.jsonl's clock at the last step; the anchor: its train_runtime). The
exports are then scored by the same command, `bertlaunch retrieval` (exact search, nDCG@10 by trec_eval through
ir-measures). Goal (issue 25): nDCG@10 >= the anchor's - 0.01, wall time <= 0.7x the anchor's.
Also: the first --gather-steps losses of 2 ranks x 16 rows (negatives gathered across the ranks) against 1 rank x
32 rows, the same global batch, dropout off: the same loss to rounding.
Writes bench/results/embed_minilm_<machine>.json.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.env import bench_parser, machine_info, write_result  # noqa: E402

ENV = dict(os.environ, DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_MODE="disabled",
           PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")

ANCHOR = """
import json, sys
from datasets import Dataset
from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments
from sentence_transformers.losses import MultipleNegativesRankingLoss
model_dir, train, out, seed = sys.argv[1:5]
rows = [json.loads(x) for x in open(train)]
model = SentenceTransformer(model_dir, device="cpu")
args = SentenceTransformerTrainingArguments(output_dir=out + "/trainer", num_train_epochs=1,
    per_device_train_batch_size=32, learning_rate=5e-5, warmup_ratio=0.1, weight_decay=0.0, seed=int(seed),
    report_to="none", save_strategy="no", logging_steps=10, use_cpu=True, dataloader_drop_last=False)
trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                                     loss=MultipleNegativesRankingLoss(model, scale=20.0))
trainer.train()
model.save(out + "/model")
"""


def timed(cmd: list[str], log: Path) -> float:
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=REPO, env=ENV, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{log.read_text()[-3000:]}")
    return time.perf_counter() - t0


def retrieval(model: Path, beir: Path, out: Path) -> dict:
    timed([sys.executable, "-m", "bertlaunch.tools.retrieval", str(model), str(beir), "--out", str(out)],
          out.with_name(out.stem + "_retrieval.log"))
    return json.loads(out.read_text())


def train_clock(out: Path) -> float:
    """Seconds from the start of our training loop to its last logged step (metrics.jsonl's clock)."""
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x][-1]["time"]


def losses(out: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]


def main() -> None:
    ap = bench_parser(__doc__)
    ap.add_argument("--mrpc", default=str(REPO.parent / "shared" / "data" / "mrpc"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--gather-steps", type=int, default=20)
    args = ap.parse_args()
    from bertlaunch.data.corpus.embedded import resolve_model_alias
    from bertlaunch.tools import pair_retrieval

    minilm = resolve_model_alias("minilm")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        pair_retrieval.main([str(tmp / "data"), "--train", f"{args.mrpc}/train.tsv", "--eval", f"{args.mrpc}/test.tsv"])
        train, beir = tmp / "data" / "train.jsonl", tmp / "data" / "beir"
        ours_cmd = [sys.executable, "launch/embed.py", "--config", "configs/embed_minilm.yaml",
                    f"task.train_file={train}", "task.eval_dir=null", "log.progress=false"]
        base = retrieval(Path(minilm), beir, tmp / "base.json")
        kinds = ("ours", "ours_torch_linear", "anchor")
        runs: dict[str, list[dict]] = {k: [] for k in kinds}
        for rnd in range(args.rounds):
            for kind in kinds[rnd % 3:] + kinds[:rnd % 3]:  # each goes first in turn
                out, log = tmp / f"{kind}{rnd}", tmp / f"{kind}{rnd}.log"
                if kind == "anchor":
                    wall = timed([sys.executable, "-c", ANCHOR, minilm, str(train), str(out), "42"], log)
                    runtime = re.findall(r"'train_runtime': '?([0-9.]+)", log.read_text())[-1]
                    model, train_s = out / "model", float(runtime)
                else:
                    linear = "torch" if kind == "ours_torch_linear" else "onednn"
                    wall = timed([*ours_cmd, f"output_dir={out}", f"model.cpu_linear={linear}"], log)
                    model, train_s = out / "final", train_clock(out)
                scores = retrieval(model, beir, tmp / f"{kind}{rnd}.json")
                runs[kind].append({"wall_s": wall, "train_s": train_s,
                                   **{k: scores[k] for k in ("ndcg@10", "recall@100", "mrr@10")}})
                print(kind, rnd, json.dumps(runs[kind][-1]), flush=True)
        # gathered negatives: 2 ranks x 16 rows against 1 rank x 32 rows, one global batch of 32; dropout off (each
        # rank draws its own dropout masks, so with dropout the two runs differ by more than rounding)
        n = args.gather_steps
        ours_cmd = [*ours_cmd, "model.hidden_dropout=0.0", "model.attention_dropout=0.0"]
        one, two = tmp / "one_rank", tmp / "two_ranks"
        timed([*ours_cmd, f"output_dir={one}", f"train.max_steps={n}", "log.every=1"], tmp / "one.log")
        timed([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
               *ours_cmd[1:], f"output_dir={two}", f"train.max_steps={n}", "log.every=1", "train.micro_batch_size=16"],
              tmp / "two.log")
        l1, l2 = losses(one), losses(two)
    metrics = ("wall_s", "train_s", "ndcg@10", "recall@100", "mrr@10")
    med = {k: {m: statistics.median(r[m] for r in v) for m in metrics} for k, v in runs.items()}
    paired = {k: statistics.median(a["wall_s"] / b["wall_s"] for a, b in zip(runs[k], runs["anchor"]))
              for k in ("ours", "ours_torch_linear")}
    res = {"machine": machine_info(), "command": " ".join(sys.argv), "data": "MRPC positive train pairs -> MRPC test "
           "retrieval (1147 queries, 1698 documents)", "minilm_before_training": base, "runs": runs,
           "gathered_negatives": {"steps": n, "one_rank_losses": l1, "two_rank_losses": l2,
                                  "max_abs_diff": max(abs(a - b) for a, b in zip(l1, l2))},
           "summary": {"ndcg@10_ours": med["ours"]["ndcg@10"], "ndcg@10_anchor": med["anchor"]["ndcg@10"],
                       "ndcg@10_before": base["ndcg@10"],
                       "ndcg@10_diff": med["ours"]["ndcg@10"] - med["anchor"]["ndcg@10"],
                       **{f"{m}_{k}": med[k][m] for k in kinds for m in ("wall_s", "train_s")},
                       "wall_ratio": med["ours"]["wall_s"] / med["anchor"]["wall_s"],
                       "wall_ratio_paired_median": paired["ours"],
                       "wall_ratio_torch_linear": med["ours_torch_linear"]["wall_s"] / med["anchor"]["wall_s"],
                       "wall_ratio_torch_linear_paired_median": paired["ours_torch_linear"],
                       "gathered_vs_one_rank_max_abs_loss_diff": max(abs(a - b) for a, b in zip(l1, l2)),
                       "goals": "ndcg@10_diff >= -0.01, wall_ratio <= 0.7"}}
    write_result(res, "embed_minilm", args.out)


if __name__ == "__main__":
    main()
