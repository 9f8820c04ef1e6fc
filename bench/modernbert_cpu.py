"""ModernBERT-mini MLM pretraining on the CPU, side by side in paired rounds:

  ours          `python launch/pretrain.py` (DeepSpeed ZeRO-0, streaming WikiText-2, packing, masking in a loader
                worker, sparse MLM head), model.preset=modernbert-mini
  ours_isolate  the same with data.isolate_documents=true (each document attends only to itself: a block-diagonal
                mask on the CPU) - the cost of document isolation
  hf_trainer    transformers' Trainer + DataCollatorForLanguageModeling on the same ModernBertForMaskedLM config
                (as HF ships it: dense MLM head), the same corpus tokenized and grouped into blocks as run_mlm.py
                does, the same batch, lr, fused AdamW, fp32

    python bench/modernbert_cpu.py [--rounds 3] [--steps 60]
    python bench/modernbert_cpu.py --interleaved 40     # the isolation cost alone, step by step

Each side of a round is a separate run, so on a machine shared with other work a round's ratio moves with the
load. `--interleaved N` measures the isolation cost where load cannot bias it: one process, one model, real
WikiText-2 batches, training steps (forward, backward, AdamW) alternating plain / isolated on the same batch, N
pairs; the median of the per-pair time ratios (-> modernbert_isolation_<machine>.json).

Each round runs every side once (ours twice: plain and isolated); a side's rate is its steady-state tokens/s after
`--warmup` steps. The ratios are per round (ours / hf_trainer, ours_isolate / ours), then the median over rounds.
Writes bench/results/modernbert_cpu_<machine>.json.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.env import bench_parser, machine_info, run_pretrain, write_result  # noqa: E402

PRESET, BLOCK, BATCH, LR, MLM = "modernbert-mini", 128, 16, 5e-4, 0.15


def ours(files: list[str], steps: int, warmup: int, tmp: Path, isolate: bool) -> float:
    import yaml

    out = tmp / f"ours_{isolate}"
    cfg = {"output_dir": str(out), "model": {"preset": PRESET},
           "data": {"train_files": files, "block_size": BLOCK, "num_workers": 1, "mlm_probability": MLM,
                    "isolate_documents": isolate},
           "train": {"max_steps": steps, "micro_batch_size": BATCH, "lr": LR, "warmup_steps": 10, "precision": "fp32",
                     "seed": 0, "resume": "none"},
           "deepspeed": {"config": "ds_configs/zero0.json"}, "eval": {"every": 0},
           "log": {"every": 5, "wandb": {"mode": "disabled"}, "progress": False},
           "checkpoint": {"every": 0, "at_end": False}}
    (tmp / "ours.yaml").write_text(yaml.safe_dump(cfg))
    run_pretrain(tmp / "ours.yaml")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    a = next(r for r in rows if r["step"] >= warmup)
    return (rows[-1]["tokens"] - a["tokens"]) / (rows[-1]["time"] - a["time"])


def hf_trainer(files: list[str], steps: int, warmup: int, tmp: Path) -> float:
    import torch
    from datasets import load_dataset
    from transformers import (
        DataCollatorForLanguageModeling,
        ModernBertForMaskedLM,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from bertlaunch.data.tokenize import load_hf_tokenizer, load_spec
    from bertlaunch.model.build import preset_config

    tok = load_hf_tokenizer("bert-base-uncased")
    spec = load_spec("bert-base-uncased")
    raw = load_dataset("text", data_files=files, split="train")
    raw = raw.filter(lambda r: r["text"].strip() != "")

    def group(batch):  # run_mlm.py's group_texts
        joined = sum(batch["input_ids"], [])
        n = len(joined) // BLOCK * BLOCK
        return {"input_ids": [joined[i:i + BLOCK] for i in range(0, n, BLOCK)]}

    ds = raw.map(lambda b: tok(b["text"]), batched=True, remove_columns=["text"])
    ds = ds.remove_columns([c for c in ds.column_names if c != "input_ids"]).map(group, batched=True)
    torch.manual_seed(0)
    model = ModernBertForMaskedLM(preset_config(PRESET, spec.vocab_size, spec.pad_id, None, "sdpa", spec.cls_id,
                                                spec.sep_id))
    stamps = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            stamps.append(time.perf_counter())

    args = TrainingArguments(output_dir=str(tmp / "hf"), per_device_train_batch_size=BATCH, learning_rate=LR,
                             warmup_steps=10, max_steps=steps, optim="adamw_torch_fused", report_to=[],
                             save_strategy="no", logging_steps=10**6, use_cpu=True, seed=0,
                             dataloader_num_workers=1)
    Trainer(model=model, args=args, train_dataset=ds, callbacks=[Clock()],
            data_collator=DataCollatorForLanguageModeling(tok, mlm_probability=MLM)).train()
    return (steps - warmup) * BATCH * BLOCK / (stamps[-1] - stamps[warmup - 1])


def interleaved(files: list[str], pairs: int) -> dict:
    import torch

    from bertlaunch.core.config import ModelConfig
    from bertlaunch.data.corpus.reader import file_sizes
    from bertlaunch.data.mlm.batches import MLMDataset, MLMSettings, initial_states
    from bertlaunch.data.tokenize import load_spec
    from bertlaunch.model.build import load_mlm
    from bertlaunch.model.mlm import MaskedLM
    from bertlaunch.model.packed import use_varlen

    spec = load_spec("bert-base-uncased")
    torch.manual_seed(0)
    hf, _ = load_mlm(ModelConfig(preset=PRESET), spec, None)
    use_varlen(hf)
    model = MaskedLM(hf).train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, fused=True)
    s = MLMSettings(block_size=BLOCK, micro_batch_size=BATCH, mlm_probability=MLM, whole_word_masking=False, seed=0,
                    isolate_documents=True)
    batches = iter(MLMDataset(files, file_sizes(files), spec, s, initial_states(0, 1, 1)))
    times = {"plain": [], "isolated": []}
    for i in range(pairs + 3):
        b = next(batches)
        for side in ("plain", "isolated") if i % 2 else ("isolated", "plain"):  # alternate which goes first
            isolated = side == "isolated"
            extra = {"doc_starts": b["doc_starts"], "max_doc_len": b["meta"]["max_doc_len"]} if isolated else {}
            t = time.perf_counter()
            model(b["input_ids"], mlm_rows=b["mlm_rows"], mlm_targets=b["mlm_targets"], **extra).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            times[side].append(time.perf_counter() - t)
    ratios = [i / p for p, i in zip(times["plain"][3:], times["isolated"][3:])]  # the first 3 pairs: warm-up
    return {"pairs": pairs, "isolated_over_plain_median": round(statistics.median(ratios), 4),
            "step_s_median": {k: round(statistics.median(v[3:]), 4) for k, v in times.items()}}


def main() -> None:
    ap = bench_parser(__doc__)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=15)
    ap.add_argument("--interleaved", type=int, default=0, help="only the interleaved isolation cost, N pairs")
    a = ap.parse_args()
    if a.interleaved:
        res = interleaved(a.files, a.interleaved)
        summary = {"isolate_documents_cost_median": round(res["isolated_over_plain_median"] - 1, 4),
                   "goal": "<= 10%"}
        write_result({"bench": "modernbert_isolation", "machine": machine_info(), "files": a.files,
                      "setup": {"preset": PRESET, "block": BLOCK, "batch": BATCH, "precision": "fp32"}, **res,
                      "summary": summary}, "modernbert_isolation", a.out)
        return
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.rounds):
            row = {"ours": ours(a.files, a.steps, a.warmup, Path(tmp), False),
                   "hf_trainer": hf_trainer(a.files, a.steps, a.warmup, Path(tmp)),
                   "ours_isolate": ours(a.files, a.steps, a.warmup, Path(tmp), True)}
            row = {k: round(v) for k, v in row.items()}
            print(f"round {r}: {row}", flush=True)
            rounds.append(row)
    speed = [x["ours"] / x["hf_trainer"] for x in rounds]
    cost = [1 - x["ours_isolate"] / x["ours"] for x in rounds]
    summary = {"ours_vs_hf_trainer_median": round(statistics.median(speed), 3),
               "isolate_documents_cost_median": round(statistics.median(cost), 4),
               "tokens_per_s_median": {k: statistics.median(x[k] for x in rounds) for k in rounds[0]},
               "goal": "ours >= 1.5x HF Trainer; isolate_documents costs <= 10%"}
    write_result({"bench": "modernbert_cpu", "machine": machine_info(), "files": a.files,
                  "setup": {"preset": PRESET, "block": BLOCK, "batch": BATCH, "lr": LR, "mlm_probability": MLM,
                            "steps": a.steps, "warmup": a.warmup, "precision": "fp32"},
                  "rounds": rounds, "summary": summary}, "modernbert_cpu", a.out)


if __name__ == "__main__":
    main()
