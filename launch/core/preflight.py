"""What `--dry-run` prints of an assembled run (launch/core/assemble.py) and how it ends.

Runs without a process group (also inside a SLURM allocation: it reads the same variables the training
processes would). Every problem found is printed, and the exit code is 2 if there was one.
"""

from __future__ import annotations

import socket
import sys
from dataclasses import dataclass, field

from bertlaunch.core import dist, jobs
from bertlaunch.core.downstream import export_steps
from bertlaunch.core.engine import zero_stage
from bertlaunch.core.exits import EXIT_CONFIG, EXIT_OK
from bertlaunch.core.plan import Plan
from bertlaunch.core.task import Model, Resume
from bertlaunch.model.build import rope_bases
from bertlaunch.model.packed import VARLEN

GIB = 1 << 30


@dataclass
class Preflight:
    """The dry run's collected problems; finish() prints them and gives the exit code."""

    problems: list[str] = field(default_factory=list)

    def finish(self) -> int:
        if self.problems:
            print(f"\n{len(self.problems)} problem(s):\n  - " + "\n  - ".join(self.problems), file=sys.stderr)
            return EXIT_CONFIG
        print("\ndry run OK: nothing was trained")
        return EXIT_OK


def count(n: float) -> str:
    return f"{n / 1e9:.3g}B" if n >= 1e9 else f"{n / 1e6:.3g}M"


def show(dry: Preflight, cfg, info: dist.DistInfo, p: Plan, model: Model | None, resume: Resume, workers: int,
         longest: int) -> None:
    """The world, batch arithmetic, steps, schedule, precision, model, memory, phases and the resume point."""
    t = cfg.train
    nodes = dist.slurm_nodes() if info.launcher == "slurm" else []
    print(f"launcher      {info.launcher}: world size {info.world_size} (rank {info.rank}, local rank "
          f"{info.local_rank} of {info.local_world_size}), master {info.master_addr}:{info.master_port}"
          + (f"; {len(nodes)} node(s): {', '.join(nodes)} (this rank on {socket.gethostname()})" if nodes else ""))
    first = p.phases[0]
    print(f"batch         global {p.global_batch} = micro {first.micro} x accumulation {p.accum} x world "
          f"{info.world_size}; {workers} data stream(s) per rank")
    for note in p.notes:
        print(f"  note: {note}")
    slots = sum(ph.global_batch * ph.block_size * (ph.end - ph.start) for ph in p.phases if ph.block_size)
    print(f"steps         {p.total_steps}" + (f" ({p.steps_per_epoch} per epoch)" if p.steps_per_epoch else "")
          + (f" = {count(slots)} token slots" if slots else "")
          + f", warmup {p.warmup_steps}; lr {t.lr:g} {t.schedule}"
          + (f" (decay over the last {t.decay_ratio:.0%})" if t.schedule == "wsd" else "")
          + (f", floor {t.min_lr_ratio:g} x lr" if t.min_lr_ratio else "")
          + (f"; time budget {t.time_budget_h:g} h (the lr follows the time used; max_steps is a cap)"
             if t.time_budget_h else ""))
    print(f"precision     {p.precision}; DeepSpeed ZeRO stage {zero_stage(p.ds_config)} ({cfg.deepspeed.config})"
          + linear_kernel(cfg.model.cpu_linear, p.precision))
    if model is not None:
        c = model.config
        print(f"model         {model.name}: {model.params / 1e6:.1f}M parameters; {architecture(c)}")
        print("memory/device " + memory_table(model.params, c, first.block_size or longest, first.micro,
                                              info.world_size, p.precision))
        for ph in p.phases if len(p.phases) > 1 else ():
            mem = memory_table(model.params, c, ph.block_size, ph.micro, info.world_size, p.precision).split("\n")
            print(f"phase {ph.index:<7} steps {ph.start}-{ph.end} ({ph.end - ph.start}), block {ph.block_size}, "
                  f"global batch {ph.global_batch} = micro {ph.micro} x accumulation {ph.accum} x world "
                  f"{info.world_size}, {count(ph.global_batch * ph.block_size * (ph.end - ph.start))} token slots"
                  + phase_settings(ph.settings, c) + "; memory " + mem[zero_stage(p.ds_config)].strip())
    export_at = sorted(cfg.checkpoint.export_at or [])
    steps = [] if t.time_budget_h else export_steps(export_at, p.total_steps)
    if export_at:
        print("exports       " + ", ".join(f"{f:.0%}" for f in export_at)
              + (" of the time budget" if t.time_budget_h else f" = step(s) {', '.join(map(str, steps))}")
              + f" -> {cfg.output_dir}/exports/step_N/")
    scoring = getattr(cfg.eval, "downstream", None)  # pretraining's eval.downstream
    if scoring is not None and scoring.active():
        print("\n".join(jobs.describe(scoring, info, cfg.output_dir, steps, resume.step)))
    if resume.path is None:
        print(f"resume        none: starts at step 0 (train.resume={t.resume})")
    else:
        saved = resume.saved
        print(f"resume        from {resume.path} at step {resume.step}" + (
            f" (resized from {saved['world_size']} rank(s) x {saved['workers']} worker(s))" if resume.resplit
            else "") + (f" (to be downloaded from {resume.source})" if resume.source else ""))


def architecture(c) -> str:
    """One line of a transformers config: family, layers x hidden, heads, feed-forward, attention pattern,
    positions (learned, relative or RoPE with its bases), vocab."""
    modern = c.model_type == "modernbert"
    parts = [f"{c.model_type}, {c.num_hidden_layers} layers x {c.hidden_size}, {c.num_attention_heads} heads, "
             f"{'GeGLU ' if modern else ''}feed-forward {c.intermediate_size}"]
    if modern:
        n_global = sum(t == "full_attention" for t in c.layer_types)
        parts.append(f"local window {c.local_attention} in {c.num_hidden_layers - n_global} layer(s), global "
                     f"attention in {n_global}")
    parts.append(f"{c.max_position_embeddings} positions " + positions(c))
    parts.append(f"vocab {c.vocab_size}")
    return ", ".join(parts)


def positions(c) -> str:
    """How a config's positions work: RoPE and its bases, relative, or learned absolute."""
    bases = rope_bases(c)
    if bases:
        return "(RoPE, base " + " / ".join(f"{k} {v:g}" if k != "all" else f"{v:g}" for k, v in bases.items()) + ")"
    if getattr(c, "relative_attention", False) or getattr(c, "position_embedding_type", "absolute") != "absolute":
        return "(relative)"
    return "(learned)"


def phase_settings(settings: dict, c) -> str:
    """What a phase changes: its batch-warmup stage, masking rate, RoPE base."""
    out = [settings["stage"]] if "stage" in settings else []
    if "mlm_probability" in settings:
        out.append(f"masking {settings['mlm_probability']:.0%}")
    if "rope_theta" in settings:
        out.append(f"RoPE base {settings['rope_theta']:g}" + (" (global layers)" if "global" in rope_bases(c) else ""))
    return "".join(f", {x}" for x in out)


def memory_table(params: int, c, seq: int, micro: int, world: int, precision: str) -> str:
    """Per-device estimate: weights/grads/optimizer by ZeRO stage + activations (no recomputation; GPU kernels)."""
    hidden, layers, heads = c.hidden_size, c.num_hidden_layers, c.num_attention_heads
    p16 = 2 if precision in ("bf16", "fp16") else 4
    master = 12 if precision in ("bf16", "fp16") else 8  # fp32 master (when mixed) + Adam m, v
    model_states = {0: params * (p16 + p16 + master), 1: params * (p16 + p16 + master / world),
                    2: params * (p16 + (p16 + master) / world), 3: params * (p16 + p16 + master) / world}
    # the seq x seq scores are kept unless attention runs on variable-length FlashAttention (model/packed.py)
    scores = 0 if getattr(c, "_attn_implementation", None) == VARLEN else 5 * heads * seq * seq * micro
    act = layers * (34 * seq * micro * hidden + scores) * (p16 / 2)
    rows = [f"stage {s}: {(m + act) / GIB:6.2f} GiB (model states {m / GIB:.2f} + activations {act / GIB:.2f})"
            for s, m in model_states.items()]
    return "\n              ".join(rows)


def linear_kernel(choice: str, precision: str) -> str:
    """What model.cpu_linear=onednn does in this run (nothing is said for the default)."""
    if choice != "onednn":
        return ""
    if dist.device().type != "cpu" or precision != "fp32":
        return f"; model.cpu_linear=onednn has no effect here ({dist.device().type}, {precision}: torch's products)"
    return "; linear layers multiplied by oneDNN (model.cpu_linear)"
