"""GPU benchmark: BERT-base MLM pretraining, seq 128, bf16, one GPU, measured side by side in one process:

  hf_plain     the reference's "what a user gets today": BertForMaskedLM (SDPA), autocast bf16,
               fused AdamW, dense MLM head, plain torch loop, random tokens, batch 256
  hf_trainer   the same model through transformers' Trainer (bf16, adamw_torch_fused)
  ours_zeroN   our real training path (launch/core/assemble.py: streaming data workers, packing,
               masking, DeepSpeed engine ZeRO-N, bf16, sparse MLM head, torch.compile)
ModernBERT-base at 1024 tokens (issue 23; goal on one H200: >= 400k tokens/s):
  mb_plain     ModernBertForMaskedLM as transformers ships it (SDPA, dense head), autocast bf16, fused AdamW
  mb:S:B[:f]   ours: model.preset=modernbert-base, block 1024, micro-batch B, ZeRO-S, bf16, documents isolated
               (variable-length FlashAttention, model/packed.py), StableAdamW; flags: compile, noisolate

    python bench/gpu_pretrain.py --out DIR [--tokenizer DIR] [--tiny]   (--tiny: a CPU smoke test)
Writes DIR/gpu_pretrain.jsonl. MFU: tokens/s x FLOP/token / 989.4 TFLOP/s (dense bf16, H100/H200);
"mfu_668" uses the reference's 668 MFLOP/token (dense head) for every row so that rows compare.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
PEAK, FLOP_668 = 989.4e12, 668e6
NODROP = ("model.hidden_dropout=0", "model.attention_dropout=0")
COMPILE = [True]  # set to False after the first torch.compile failure
RUNS = Path(os.environ.get("BENCH_RUNS", "/tmp/gpu_pretrain_runs"))  # run folders stay on the machine
OUT = None


def emit(**r):
    line = json.dumps(r)
    print(line, flush=True)
    with open(OUT / "gpu_pretrain.jsonl", "a") as f:
        f.write(line + "\n")


def model_config(tiny: bool, attn="sdpa"):
    from transformers import BertConfig

    if tiny:
        return BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256,
                          attn_implementation=attn)
    return BertConfig(attn_implementation=attn)


def timed_steps(step, warm: int, steps: int, cuda: bool) -> float:
    import torch

    for _ in range(warm):
        step()
    if cuda:
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t


def hf_plain(batch: int, seq: int, steps: int, warm: int, tiny: bool, compile_: bool = False, modern: bool = False):
    import torch
    from transformers import BertForMaskedLM, ModernBertForMaskedLM

    from bertlaunch.model.build import preset_config

    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(0)
    if modern:
        config = preset_config("modernbert-tiny" if tiny else "modernbert-base", 30528, 0, None, "sdpa", 101, 102)
        model = ModernBertForMaskedLM(config).to(dev)
    else:
        model = BertForMaskedLM(model_config(tiny)).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    fwd = torch.compile(model) if compile_ else model
    ids = torch.randint(1000, 30000, (batch, seq), device=dev)
    labels = torch.where(torch.rand(batch, seq, device=dev) < 0.15, ids, torch.full_like(ids, -100))
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    def step():
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda):
            loss = fwd(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    dt = timed_steps(step, warm, steps, cuda)
    tps = steps * batch * seq / dt
    emit(case=("mb_plain" if modern else "hf_plain") + ("_compiled" if compile_ else ""), batch=batch, seq=seq,
         tokens_per_s=round(tps),
         mfu_668=round(tps * FLOP_668 / PEAK, 4), step_ms=round(1000 * dt / steps, 2),
         peak_mem_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None)
    return tps


def hf_trainer(batch: int, seq: int, steps: int, warm: int, tiny: bool):
    import torch
    from transformers import BertForMaskedLM, Trainer, TrainerCallback, TrainingArguments

    cuda = torch.cuda.is_available()
    torch.manual_seed(0)
    n = batch * (steps + warm)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 30000, (n, seq), generator=g)
    labels = torch.where(torch.rand(n, seq, generator=g) < 0.15, ids, torch.full_like(ids, -100))

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return n

        def __getitem__(self, i):
            return {"input_ids": ids[i], "labels": labels[i]}

    times = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter())

    args = TrainingArguments(output_dir=str(OUT / "hf_trainer"), per_device_train_batch_size=batch, bf16=cuda,
                             optim="adamw_torch_fused", learning_rate=1e-4, max_steps=steps + warm, report_to=[],
                             save_strategy="no", logging_steps=10**6, dataloader_num_workers=2, use_cpu=not cuda)
    trainer = Trainer(model=BertForMaskedLM(model_config(tiny)), args=args, train_dataset=DS(), callbacks=[Clock()])
    trainer.train()
    dt = times[-1] - times[warm - 1]
    tps = steps * batch * seq / dt
    emit(case="hf_trainer", batch=batch, tokens_per_s=round(tps), mfu_668=round(tps * FLOP_668 / PEAK, 4),
         step_ms=round(1000 * dt / steps, 2))
    del trainer
    return tps


def ours(stage: int, batch: int, seq: int, steps: int, tiny: bool, tokenizer: str, workers: int, compile_: bool,
         info, extra=(), tag=""):
    import torch

    from bertlaunch.core import configlib
    from bertlaunch.core.assemble import assemble
    from bertlaunch.tasks.mlm.config import PretrainConfig
    from bertlaunch.tasks.mlm.spec import PRETRAIN

    cuda = torch.cuda.is_available()
    name = f"ours_zero{stage}_b{batch}" + (f"_{tag}" if tag else "")
    out = RUNS / name
    overrides = [f"output_dir={out}", f"tokenizer={tokenizer}", "model.preset=" + ("tiny" if tiny else "bert-base"),
                 "data.train_files=[embedded:pydoc]", f"data.block_size={seq}", f"data.num_workers={workers}",
                 f"train.max_steps={steps}", f"train.micro_batch_size={batch}", "train.lr=1e-4",
                 "train.warmup_steps=10", "train.precision=" + ("bf16" if cuda else "fp32"),
                 f"deepspeed.config={REPO / 'ds_configs' / f'zero{stage}.json'}", "log.every=5", "log.progress=false",
                 "log.wandb.mode=disabled", "checkpoint.at_end=false", f"model.compile={str(compile_).lower()}",
                 "train.resume=none", *extra]
    compile_ = compile_ and COMPILE[0]
    overrides.append(f"model.compile={str(compile_).lower()}")  # later overrides win
    cfg = configlib.load(PretrainConfig, None, overrides)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    assemble(PRETRAIN, cfg, info).fit()
    wall = time.time() - t0
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"tokens_per_s"' in x]
    steady = [r for r in recs if r["step"] > max(steps // 3, min(20, steps - 5))]  # after compile, warm-up
    tps = statistics.median(r["tokens_per_s"] for r in steady)
    mfu = statistics.median(r.get("mfu", 0) or 0 for r in steady)
    if (out / "profile.txt").is_file():
        (OUT / f"profile_{name}.txt").write_text((out / "profile.txt").read_text())
    emit(case=name, batch=batch, compile=compile_,
         tokens_per_s=round(tps),
         mfu_actual_flops=round(mfu, 4), mfu_668=round(tps * FLOP_668 / PEAK, 4),
         peak_mem_gib=round(max(r.get("mem_peak_gib", 0) or 0 for r in recs), 2), wall_s=round(wall, 1),
         loss_first=recs[0]["loss"], loss_last=recs[-1]["loss"], extra=list(extra))
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return tps


def main() -> None:
    global OUT
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.environ.get("OUT", "bench/tmp"))
    p.add_argument("--tokenizer", default="bert-base-uncased")
    p.add_argument("--tiny", action="store_true", help="tiny model on the CPU: a smoke test of this script")
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--cases", default="plain,ours:2:1,ours:2:1:nodrop,ours:0:1,ours:2:2:nodrop,trainer,ours:1:1,"
                                      "ours:3:1,mb_plain,mb:1:64,mb:1:64:compile,mb:1:64:noisolate")
    args = p.parse_args()
    OUT = Path(args.out)
    OUT.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    import transformers

    from bertlaunch.core import dist

    cuda = torch.cuda.is_available()
    emit(device=torch.cuda.get_device_name(0) if cuda else "cpu", torch=torch.__version__,
         transformers=transformers.__version__, deepspeed=__import__("deepspeed").__version__)
    if cuda:
        a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        b = torch.randn_like(a)
        dt = timed_steps(lambda: a @ b, 3, 10, True)
        emit(case="matmul_8192_bf16", tflops=round(10 * 2 * 8192**3 / dt / 1e12, 1))
        del a, b
    batch, seq, steps = (8, 64, 12) if args.tiny else (256, 128, args.steps)
    workers = 2 if args.tiny else 8
    info = dist.init(600)
    cases = args.cases.split(",")
    def ours_case(spec: str):
        """ours:<stage>:<batch x 256 | tiny batch>:<flags joined by +> e.g. ours:1:2:nodrop+fast
        flags: nodrop (dropout 0), fast (train.nan_check=log_steps: no per-step host sync), prof (profile)."""
        _, stage, mult, *flags = spec.split(":")
        flags = flags[0].split("+") if flags and flags[0] else []
        extra = (NODROP if "nodrop" in flags else ()) + (("train.nan_check=log_steps",) if "fast" in flags else ())
        extra += ("log.profile=true",) if "prof" in flags else ()
        stage = int(stage)
        return lambda: ours(stage, batch * int(mult), seq, steps, args.tiny, args.tokenizer, workers,
                            cuda and stage != 3, info, extra, tag="_".join(flags))

    mb_seq = 64 if args.tiny else 1024

    def mb_case(spec: str):
        """mb:<stage>:<micro-batch at 1024 tokens (tiny: 8)>[:flags joined by +]; flags: compile, noisolate."""
        _, stage, micro, *flags = spec.split(":")
        flags = flags[0].split("+") if flags and flags[0] else []
        extra = ("model.preset=" + ("modernbert-tiny" if args.tiny else "modernbert-base"),
                 "data.isolate_documents=" + str("noisolate" not in flags).lower(), "train.optimizer=stableadamw",
                 "train.nan_check=log_steps", "model.pad_vocab_to_multiple_of=64")
        stage = int(stage)
        return lambda: ours(stage, 8 if args.tiny else int(micro), mb_seq, steps, args.tiny, args.tokenizer, workers,
                            cuda and "compile" in flags, info, extra, tag="_".join(["mb", *flags]))

    runners = {
        "plain": lambda: hf_plain(batch, seq, 30 if not args.tiny else 4, 10 if not args.tiny else 2, args.tiny),
        "mb_plain": lambda: hf_plain(8 if args.tiny else 32, mb_seq, 30 if not args.tiny else 4,
                                     10 if not args.tiny else 2, args.tiny, modern=True),
        "trainer": lambda: hf_trainer(batch, seq, 30 if not args.tiny else 4, 10 if not args.tiny else 2, args.tiny),
    }
    runners.update({c: ours_case(c) for c in cases if c.startswith("ours:")})
    runners.update({c: mb_case(c) for c in cases if c.startswith("mb:")})
    results = {}
    for name in cases:
        try:
            results[name] = runners[name]()
        except Exception as e:  # one failing case must not cost the others
            import traceback

            traceback.print_exc()
            emit(case=name, error=f"{type(e).__name__}: {e}"[:600])
            if name.startswith("ours") and cuda and COMPILE[0]:  # retry (and continue) without torch.compile
                COMPILE[0] = False
                try:
                    results[name + "_eager"] = runners[name]()
                except Exception as e2:
                    emit(case=name + "_eager", error=f"{type(e2).__name__}: {e2}"[:600])
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    if "plain" in results:
        results = {k: v for k, v in results.items() if v}
        emit(summary={k: round(v / results["plain"], 3) for k, v in results.items()}, note="tokens/s vs hf_plain")
    mb = {k: v for k, v in results.items() if k.startswith("mb") and v}
    if mb:
        emit(summary_modernbert={k: round(v) for k, v in mb.items()}, goal="ours >= 400k tokens/s on one H200",
             best=round(max(v for k, v in mb.items() if k.startswith("mb:")), 0) if len(mb) > ("mb_plain" in mb)
             else None)
    dist.destroy()


if __name__ == "__main__":
    main()
