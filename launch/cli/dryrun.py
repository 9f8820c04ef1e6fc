"""`--dry-run`: validate everything and print the plan and one decoded batch; train nothing; exit 0.

Runs without starting a process group (also inside a SLURM allocation: it reads the same variables the
training processes would). Every problem found is printed, and the exit code is 2 if there was one.
"""

from __future__ import annotations

import math
import socket
import sys

from data.sources import file_sizes, resolve_files
from launch.core import dist
from launch.core.engine import zero_stage
from launch.core.plan import Plan, make_plan
from launch.tasks.mlm.config import use_storage

GIB = 1 << 30


def _show_plan(cfg, workers: int, problems: list[str], **plan_args) -> tuple[dist.DistInfo, Plan]:
    """The real run's plan (launch/core/plan.py) for the world this dry run sees; its problems are kept."""
    info = dist.detect()
    p, more = make_plan(cfg, info.world_size, **plan_args)
    problems += more
    nodes = dist.slurm_nodes() if info.launcher == "slurm" else []
    print(f"launcher      {info.launcher}: world size {info.world_size} (rank {info.rank}, local rank "
          f"{info.local_rank} of {info.local_world_size}), master {info.master_addr}:{info.master_port}"
          + (f"; {len(nodes)} node(s): {', '.join(nodes)} (this rank on {socket.gethostname()})" if nodes else ""))
    print(f"batch         global {p.global_batch} = micro {cfg.train.micro_batch_size} x accumulation {p.accum} x "
          f"world {info.world_size}; {workers} dataloader worker(s) per rank")
    print(f"steps         {p.total_steps}" + (f" ({p.steps_per_epoch} per epoch)" if p.steps_per_epoch else "")
          + (f" = {_count(sum(ph.global_batch * ph.block_size * (ph.end - ph.start) for ph in p.phases))} "
             "token slots" if plan_args.get("phases") else "")
          + f", warmup {p.warmup_steps}; lr {cfg.train.lr:g} {cfg.train.schedule}"
          + (f" (decay over the last {cfg.train.decay_ratio:.0%})" if cfg.train.schedule == "wsd" else "")
          + (f", floor {cfg.train.min_lr_ratio:g} x lr" if cfg.train.min_lr_ratio else "")
          + (f"; time budget {cfg.train.time_budget_h:g} h (the lr follows the time used; max_steps is a cap)"
             if cfg.train.time_budget_h else ""))
    print(f"precision     {p.precision}; DeepSpeed ZeRO stage {zero_stage(p.ds_config)} ({cfg.deepspeed.config})")
    return info, p


def _count(n: float) -> str:
    return f"{n / 1e9:.3g}B" if n >= 1e9 else f"{n / 1e6:.3g}M"


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
    from data.tokenize import load_hf_tokenizer, load_spec

    problems: list[str] = []
    workers = max(cfg.data.num_workers, 1)
    use_storage(cfg.data)
    try:
        spec, tok = load_spec(cfg.tokenizer), load_hf_tokenizer(cfg.tokenizer)
        model_cfg, params = _model_meta(cfg, spec, problems)
    except (OSError, ValueError) as e:
        problems.append(str(e))
        model_cfg = None
    info, p = _show_plan(cfg, workers, problems, hidden_size=getattr(model_cfg, "hidden_size", None),
                         phases=cfg.phase_specs(), warmup_tokens=cfg.train.warmup_tokens)
    if model_cfg is None:  # no tokenizer or model: nothing more to show, but the plan's problems are listed
        return _finish(problems)
    print(f"model         {cfg.model.preset or cfg.model.pretrained}: {params / 1e6:.1f}M parameters, vocab "
          f"{model_cfg.vocab_size} (tokenizer {spec.vocab_size})")
    print("memory/device " + memory_table(params, model_cfg.hidden_size, model_cfg.num_hidden_layers,
                                          model_cfg.num_attention_heads, cfg.data.block_size,
                                          cfg.train.micro_batch_size, info.world_size, p.precision))
    for ph in p.phases if len(p.phases) > 1 else ():
        mem = memory_table(params, model_cfg.hidden_size, model_cfg.num_hidden_layers, model_cfg.num_attention_heads,
                           ph.block_size, ph.micro, info.world_size, p.precision).split("\n")
        print(f"phase {ph.index}       steps {ph.start}-{ph.end} ({ph.end - ph.start}), block {ph.block_size}, "
              f"global batch {ph.global_batch} = micro {ph.micro} x accumulation {ph.accum} x world {info.world_size}, "
              f"{_count(ph.global_batch * ph.block_size * (ph.end - ph.start))} token slots; memory "
              + mem[zero_stage(p.ds_config)].strip())
    try:
        _show_data(cfg, spec, tok, info.world_size * workers, p)
    except (OSError, ValueError) as e:
        problems.append(str(e))
    return _finish(problems)


def _show_data(cfg, spec, tok, n_streams: int, p) -> None:
    """Per source: kind, files, bytes or rows, estimated tokens, weight, share and epochs in this run; then
    one masked block, read through the real loader."""
    import numpy as np

    from data.mlm import MLMDataset, MLMSettings, initial_states
    from launch.tasks.mlm.task import check_streams, mixture_sources

    d = cfg.data
    slots = sum(ph.global_batch * ph.block_size * (ph.end - ph.start) for ph in p.phases)
    sources = mixture_sources(d) if d.sources else None
    if d.cache:
        from data.cache import read_meta, shard_names_and_sizes

        files, sizes = shard_names_and_sizes(d.cache)
        est = read_meta(d.cache)["n_tokens"]
        print(f"data          token cache {d.cache}: {len(files)} shard(s), {est / 1e6:.2f}M tokens, "
              f"~{slots / max(est, 1):.2f} epoch(s) in this run, {n_streams} stream(s)")
    elif sources:
        from data.mixture import shares

        files, sizes = [], []
        print(f"data          a mixture of {len(sources)} sources, {n_streams} stream(s) each:")
        for src, share in zip(sources, shares(sources)):
            kind, size, est = _describe(src.files, src.sizes, spec, src.text_field)
            print(f"  {src.name:<12}{kind}, {len(src.files)} file(s), {size}, ~{_count(est)} tokens; weight "
                  f"{src.weight:g} -> {share:.1%} of blocks, ~{share * slots / max(est, 1):.2f} epoch(s) in this run")
    else:
        files = resolve_files(d.train_files)
        sizes = file_sizes(files)
        kind, size, est = _describe(files, sizes, spec, d.text_field)
        print(f"data          {kind}, {len(files)} file(s), {size} -> ~{est / 1e6:.2f}M tokens per epoch "
              f"(~{est / d.block_size:,.0f} blocks of {d.block_size}), ~{slots / max(est, 1):.2f} epoch(s) in this "
              f"run, {n_streams} stream(s)")
    check_streams(d, files, sizes, sources, n_streams)  # e.g. fewer compressed files than streams
    s = MLMSettings.from_config(cfg, micro_batch_size=min(cfg.train.micro_batch_size, 2), audit=False)
    batch = next(iter(MLMDataset(files, sizes, spec, s, initial_states(0, 1, 1, sources), cache=d.cache,
                                 sources=sources)))
    ids, labels = batch["input_ids"][0].numpy(), batch["labels"][0].numpy()
    print(f"one block     input ({int((labels != -100).sum())} of {len(ids)} tokens masked):\n  "
          + tok.decode(ids.tolist())[:600])
    shown = np.where(labels != -100, labels, spec.pad_id)
    print("  targets: " + " ".join(tok.convert_ids_to_tokens([int(t) for t in shown if t != spec.pad_id]))[:300])


def _model_meta(cfg, spec, problems):
    import torch
    from transformers import AutoConfig, AutoModelForMaskedLM

    from model.build import padded_vocab, preset_config, resolve_model_dir

    multiple = cfg.model.pad_vocab_to_multiple_of
    if cfg.model.preset:
        mc = preset_config(cfg.model.preset, padded_vocab(spec.vocab_size, multiple), spec.pad_id,
                           cfg.model.max_position_embeddings)
    else:
        mc = AutoConfig.from_pretrained(resolve_model_dir(cfg.model.pretrained),
                                        trust_remote_code=cfg.model.trust_remote_code)
        mc.vocab_size = padded_vocab(mc.vocab_size, multiple)
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


def _describe(files: list[str], sizes: list[int], spec, text_field: str) -> tuple[str, str, int]:
    """(kinds, size, estimated tokens) of a set of corpus files. Tokens per stored byte (text, maybe
    compressed) or per row (Parquet, counted from its metadata) are measured on up to 2 MB of text."""
    from collections import Counter

    from data.compressed import compression_of, inner_name, open_bytes
    from data.parquet import ParquetReader, is_parquet
    from data.sources import JSONL_SUFFIXES

    kinds = Counter(".".join(f.rsplit("/", 1)[-1].split(".")[-2 if compression_of(f) else -1:]) for f in files)
    kind = ", ".join(f"{k}" + (f" x{n}" if n > 1 else "") for k, n in kinds.items())
    pq_files = [f for f in files if is_parquet(f)]
    text_bytes = sum(n for f, n in zip(files, sizes) if not is_parquet(f))
    rows, est = 0, 0
    if pq_files:
        readers = [ParquetReader(f, text_field) for f in pq_files]
        rows = sum(r.rows for r in readers)
        sample, n_rows = [], 0
        for r in readers:
            for piece in r.pieces(_first_rows(r)):
                sample.append(piece.text)
                n_rows += 1
                if sum(map(len, sample)) >= 2 << 20:
                    break
        per_row = sum(map(len, spec.encode(sample))) / max(n_rows, 1) + 2 if sample else 0
        est += math.ceil(per_row * rows)
    if text_bytes:
        sample, stored = b"", 0
        for f in (f for f in files if not is_parquet(f)):
            with open_bytes(f) as fh:
                sample += fh.read((2 << 20) - len(sample))
                stored += getattr(fh, "compressed_read", None) or fh.tell()
            if len(sample) >= 2 << 20:
                break
        text = sample.decode("utf-8", errors="replace")
        if any(inner_name(f).endswith(JSONL_SUFFIXES) for f in files):
            text = "\n".join(_jsonl_texts(text, text_field))
        est += math.ceil(sum(map(len, spec.encode([text]))) / max(stored, 1) * text_bytes)
    size = (f"{text_bytes / 1e6:.1f} MB" if text_bytes else "") + (", " if text_bytes and rows else "") \
        + (f"{rows:,} rows" if rows else "")
    packed = sum(1 for f in files if compression_of(f))
    if packed:
        size += f" ({packed} compressed: each read whole by one stream)"
    return kind, size, est


def _first_rows(reader):
    from data.sources import Segment

    return Segment(0, 0, reader.per_row * min(reader.rows, 10_000))


def _jsonl_texts(text: str, field: str) -> list[str]:
    import json

    out = []
    for line in text.splitlines()[:-1]:  # the last line may be cut by the sample
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get(field), str):
            out.append(rec[field])
    return out


def dry_run_finetune(cfg) -> int:
    problems: list[str] = []
    try:
        from launch.tasks.classify.run import load_data

        data = load_data(cfg)
    except (OSError, ValueError) as e:
        return _finish(problems + [str(e)])
    import numpy as np

    from data.pairs import collate

    class Spec:
        vocab_size, pad_id = len(data.tokenizer), data.pad_id

    try:
        model_cfg, params = _model_meta(cfg, Spec, problems)
    except (OSError, ValueError) as e:
        problems.append(str(e))
        model_cfg = None
    info, p = _show_plan(cfg, 1, problems, examples=len(data.train), epochs=cfg.train.epochs,
                         hidden_size=getattr(model_cfg, "hidden_size", None))
    labels = data.labels
    print(f"task          {labels.kind}, {labels.num_labels} output(s)"
          + (f", labels {labels.names}" if labels.names else "")
          + f"; train {len(data.train)}, eval {len(data.eval) if data.eval else 0}, "
            f"test {len(data.test) if data.test else 0} examples; {p.total_steps} steps")
    print(f"lengths       mean {data.train.lengths.mean():.1f}, max {data.train.lengths.max()} tokens "
          f"(task.max_length {cfg.task.max_length})")
    if model_cfg is not None:
        print(f"model         {cfg.model.preset or cfg.model.pretrained}: {params / 1e6:.1f}M parameters, vocab "
              f"{model_cfg.vocab_size} (tokenizer {Spec.vocab_size})")
        print("memory/device " + memory_table(params, model_cfg.hidden_size, model_cfg.num_hidden_layers,
                                              model_cfg.num_attention_heads, cfg.task.max_length,
                                              cfg.train.micro_batch_size, info.world_size, p.precision))
    batch = collate(data.train, np.arange(min(2, len(data.train))), data.pad_id, labels.kind == "regression")
    for row in range(batch["meta"]["n"]):
        lab = batch["labels"][row].item()
        name = labels.names[int(lab)] if labels.kind != "regression" else f"{lab:.3g}"
        print(f"example {row}     [{name}] {data.tokenizer.decode(batch['input_ids'][row].tolist())[:300]}")
    return _finish(problems)

