"""`--dry-run`: validate everything and print the plan and one decoded batch; train nothing; exit 0.

Runs without starting a process group (also inside a SLURM allocation: it reads the same variables the
training processes would). Every problem found is printed, and the exit code is 2 if there was one.
"""

from __future__ import annotations

import math
import sys

from launch import dist
from launch.config import batch_arithmetic
from launch.engine import fill_ds_config, load_ds_json, resolve_precision, zero_stage

GIB = 1 << 30


def _plan_common(cfg, workers: int, problems: list[str]) -> tuple[dist.DistInfo, int, dict]:
    info = dist.detect()
    accum, more = batch_arithmetic(cfg.train, info.world_size)
    problems += more
    precision = resolve_precision(cfg.train.precision)
    ds, more = fill_ds_config(load_ds_json(cfg.deepspeed.config), micro=cfg.train.micro_batch_size,
                              accum=max(accum, 1), world=info.world_size, precision=precision, lr=cfg.train.lr,
                              betas=cfg.train.adam_betas, eps=cfg.train.adam_eps,
                              weight_decay=cfg.train.weight_decay, grad_clip=cfg.train.grad_clip,
                              source=f"deepspeed.config {cfg.deepspeed.config}")
    problems += more
    print(f"launcher      {info.launcher}: world size {info.world_size} (rank {info.rank}, local rank "
          f"{info.local_rank} of {info.local_world_size}), master {info.master_addr}:{info.master_port}")
    print(f"batch         global {cfg.train.global_batch_size or cfg.train.micro_batch_size * info.world_size} = "
          f"micro {cfg.train.micro_batch_size} x accumulation {accum} x world {info.world_size}; "
          f"{workers} dataloader worker(s) per rank")
    print(f"precision     {precision}; DeepSpeed ZeRO stage {zero_stage(ds)} ({cfg.deepspeed.config})")
    return info, accum, ds


def memory_table(params: int, hidden: int, layers: int, heads: int, seq: int, micro: int, world: int,
                 precision: str) -> str:
    """Per-device estimate: weights/grads/optimizer by ZeRO stage + activations (no recomputation)."""
    p16 = 2 if precision in ("bf16", "fp16") else 4
    master = 12 if precision in ("bf16", "fp16") else 8  # fp32 master (when mixed) + Adam m, v
    model_states = {0: params * (p16 + p16 + master), 1: params * (p16 + p16 + master / world),
                    2: params * (p16 + (p16 + master) / world), 3: params * (p16 + p16 + master) / world}
    act = layers * (34 * seq * micro * hidden + 5 * heads * seq * seq * micro) * (p16 / 2)
    rows = [f"stage {s}: {(m + act) / GIB:6.2f} GiB (model states {m / GIB:.2f} + activations {act / GIB:.2f})"
            for s, m in model_states.items()]
    return "\n              ".join(rows)


def _finish(problems: list[str]) -> int:
    if problems:
        print(f"\n{len(problems)} problem(s):\n  - " + "\n  - ".join(problems), file=sys.stderr)
        return 2
    print("\ndry run OK: nothing was trained")
    return 0


def dry_run_pretrain(cfg) -> int:
    import numpy as np

    from data.tokenize import load_hf_tokenizer, load_spec

    problems: list[str] = []
    workers = max(cfg.data.num_workers, 1)
    info, accum, ds = _plan_common(cfg, workers, problems)
    try:
        spec, tok = load_spec(cfg.tokenizer), load_hf_tokenizer(cfg.tokenizer)
        model_cfg, params = _model_meta(cfg, spec, problems)
    except (OSError, ValueError) as e:
        return _finish(problems + [str(e)])
    print(f"model         {cfg.model.preset or cfg.model.pretrained}: {params / 1e6:.1f}M parameters, vocab "
          f"{model_cfg.vocab_size} (tokenizer {spec.vocab_size})")
    print("memory/device " + memory_table(params, model_cfg.hidden_size, model_cfg.num_hidden_layers,
                                          model_cfg.num_attention_heads, cfg.data.block_size,
                                          cfg.train.micro_batch_size, info.world_size, resolve_precision(
                                              cfg.train.precision)))
    try:
        from data.mlm import MLMDataset, MLMSettings, initial_states

        files, sizes, est = _corpus(cfg, spec)
        n = info.world_size * workers
        blocks = est / cfg.data.block_size
        per_step = cfg.train.global_batch_size or cfg.train.micro_batch_size * info.world_size
        print(f"data          {len(files)} file(s), {sum(sizes) / 1e6:.1f} MB -> ~{est / 1e6:.2f}M tokens per epoch "
              f"(~{blocks:,.0f} blocks of {cfg.data.block_size}, ~{blocks / per_step:,.0f} steps), {n} stream(s)")
        d = cfg.data
        s = MLMSettings(d.block_size, min(cfg.train.micro_batch_size, 2), d.mlm_probability, d.whole_word_masking,
                        cfg.train.seed, d.last_block, d.txt_documents, d.text_field, d.max_chunk_bytes,
                        d.encoding_errors)
        batch = next(iter(MLMDataset(files, sizes, spec, s, initial_states(0, 1, 1), cache=d.cache)))
        ids, labels = batch["input_ids"][0].numpy(), batch["labels"][0].numpy()
        print(f"one block     input ({int((labels != -100).sum())} of {len(ids)} tokens masked):\n  "
              + tok.decode(ids.tolist())[:600])
        shown = np.where(labels != -100, labels, spec.pad_id)
        print("  targets: " + " ".join(tok.convert_ids_to_tokens([int(t) for t in shown if t != spec.pad_id]))[:300])
    except (OSError, ValueError) as e:
        problems.append(str(e))
    return _finish(problems)


def _model_meta(cfg, spec, problems):
    import torch
    from transformers import AutoConfig, AutoModelForMaskedLM

    from model.build import preset_config, resolve_model_dir

    if cfg.model.preset:
        mc = preset_config(cfg.model.preset, spec.vocab_size, spec.pad_id, cfg.model.max_position_embeddings)
    else:
        mc = AutoConfig.from_pretrained(resolve_model_dir(cfg.model.pretrained),
                                        trust_remote_code=cfg.model.trust_remote_code)
    if spec.vocab_size > mc.vocab_size:
        problems.append(f"the tokenizer has {spec.vocab_size} tokens but the model's vocab is {mc.vocab_size}: "
                        "use the model's own tokenizer (tokenizer=<model folder>)")
    block = getattr(getattr(cfg, "data", None), "block_size", None) or getattr(cfg.task, "max_length", 0)
    if block > getattr(mc, "max_position_embeddings", 1 << 30):
        problems.append(f"sequence length {block} exceeds the model's max_position_embeddings="
                        f"{mc.max_position_embeddings}")
    with torch.device("meta"):
        params = sum(p.numel() for p in AutoModelForMaskedLM.from_config(mc).parameters())
    return mc, params


def _corpus(cfg, spec):
    from data.sources import file_sizes, resolve_files

    if cfg.data.cache:
        from data.cache import read_meta, shard_names_and_sizes

        files, sizes = shard_names_and_sizes(cfg.data.cache)
        return files, sizes, read_meta(cfg.data.cache)["n_tokens"]
    files = resolve_files(cfg.data.train_files)
    sizes = file_sizes(files)
    sample = b""
    for f in files:  # tokens per byte from the first 2 MB
        with open(f, "rb") as fh:
            sample += fh.read((2 << 20) - len(sample))
        if len(sample) >= 2 << 20:
            break
    text = sample.decode("utf-8", errors="replace")
    ratio = sum(map(len, spec.encode([text]))) / max(len(sample), 1)
    return files, sizes, math.ceil(ratio * sum(sizes))


def dry_run_finetune(cfg) -> int:
    problems: list[str] = []
    info, accum, _ = _plan_common(cfg, 1, problems)
    try:
        from launch.finish import load_task_data

        data = load_task_data(cfg)
    except (OSError, ValueError) as e:
        return _finish(problems + [str(e)])
    labels = data.labels
    g = cfg.train.micro_batch_size * max(accum, 1) * info.world_size
    steps = cfg.train.max_steps or math.ceil(cfg.train.epochs * math.ceil(len(data.train) / g))
    print(f"task          {labels.kind}, {labels.num_labels} output(s)"
          + (f", labels {labels.names}" if labels.names else "")
          + f"; train {len(data.train)}, eval {len(data.eval) if data.eval else 0}, "
            f"test {len(data.test) if data.test else 0} examples; {steps} steps")
    print(f"lengths       mean {data.train.lengths.mean():.1f}, max {data.train.lengths.max()} tokens "
          f"(task.max_length {cfg.task.max_length})")
    import numpy as np

    from data.pairs import collate

    class Spec:
        vocab_size, pad_id = len(data.tokenizer), data.pad_id

    try:
        model_cfg, params = _model_meta(cfg, Spec, problems)
        print(f"model         {cfg.model.preset or cfg.model.pretrained}: {params / 1e6:.1f}M parameters, vocab "
              f"{model_cfg.vocab_size} (tokenizer {Spec.vocab_size})")
        print("memory/device " + memory_table(params, model_cfg.hidden_size, model_cfg.num_hidden_layers,
                                              model_cfg.num_attention_heads, cfg.task.max_length,
                                              cfg.train.micro_batch_size, info.world_size,
                                              resolve_precision(cfg.train.precision)))
    except (OSError, ValueError) as e:
        problems.append(str(e))
    batch = collate(data.train, np.arange(min(2, len(data.train))), data.pad_id, labels.kind == "regression")
    for row in range(batch["meta"]["n"]):
        lab = batch["labels"][row].item()
        name = labels.names[int(lab)] if labels.kind != "regression" else f"{lab:.3g}"
        print(f"example {row}     [{name}] {data.tokenizer.decode(batch['input_ids'][row].tolist())[:300]}")
    return _finish(problems)

