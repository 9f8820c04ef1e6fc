"""DeepSpeed engine from a ds_configs/ JSON whose "auto" fields are filled from the run config.

A value the JSON sets explicitly must agree with the run config; every disagreement is reported with
the key in both places, instead of DeepSpeed silently preferring one of them.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from bertlaunch.core.lamb import Lamb

AUTO = "auto"


def resolve_precision(precision: str) -> str:
    if precision != "auto":
        return precision
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def load_ds_json(path: str) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"deepspeed.config {path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"deepspeed.config {path}: the top level must be an object")
    return data


def fill_ds_config(ds: dict, *, micro: int, accum: int, world: int, precision: str, lr: float,
                   betas, eps: float, weight_decay: float, grad_clip: float, optimizer: str = "adamw",
                   source: str = "deepspeed.config") -> tuple[dict, list[str]]:
    """-> (filled config, problems). Precision must already be resolved (fp32|fp16|bf16)."""
    ds, problems = copy.deepcopy(ds), []

    def put(container: dict, key: str, value, run_key: str, where: str):
        have = container.get(key, AUTO)
        if have == AUTO:
            container[key] = value
        elif have != value:
            problems.append(f"{source}: \"{where}\" is {have!r} but the run config gives {value!r} "
                            f"({run_key}); set it to \"auto\" in the JSON or change {run_key}")

    put(ds, "train_micro_batch_size_per_gpu", micro, "train.micro_batch_size", "train_micro_batch_size_per_gpu")
    put(ds, "gradient_accumulation_steps", accum, "train.global_batch_size",
        "gradient_accumulation_steps")
    put(ds, "train_batch_size", micro * accum * world, "train.global_batch_size", "train_batch_size")
    put(ds, "gradient_clipping", float(grad_clip), "train.grad_clip", "gradient_clipping")
    for name in ("fp16", "bf16"):
        section = ds.setdefault(name, {})
        put(section, "enabled", precision == name, "train.precision", f"{name}.enabled")
    if precision == "fp16":
        ds["fp16"].setdefault("loss_scale", 0)  # dynamic loss scaling
        ds["fp16"].setdefault("initial_scale_power", 16)
    opt = ds.setdefault("optimizer", {"type": AUTO, "params": {}})
    kind = {"adamw": "AdamW", "lamb": "Lamb", "stableadamw": "StableAdamW"}[optimizer]
    if str(opt.get("type", AUTO)).lower() in (AUTO, optimizer):
        opt["type"] = kind
    else:
        put(opt, "type", kind, "train.optimizer", "optimizer.type")
    params = opt.setdefault("params", {})
    put(params, "lr", lr, "train.lr", "optimizer.params.lr")
    put(params, "betas", list(betas), "train.adam_betas", "optimizer.params.betas")
    put(params, "eps", eps, "train.adam_eps", "optimizer.params.eps")
    put(params, "weight_decay", weight_decay, "train.weight_decay", "optimizer.params.weight_decay")
    if "scheduler" in ds:
        problems.append(f"{source}: remove the \"scheduler\" section; the schedule comes from train.schedule "
                        "and train.warmup_steps (so resume and logging know the learning rate)")
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        problems.append(f"{source}: zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    if optimizer == "lamb" and stage:
        problems.append(f"{source}: train.optimizer=lamb needs zero_optimization.stage 0 (LAMB's per-layer trust "
                        "ratio needs whole tensors; ZeRO partitions flat buffers): use ds_configs/zero0.json")
    offload = ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    if offload not in ("none", None) and stage == 0:
        problems.append(f"{source}: offload_optimizer needs zero_optimization.stage >= 1")
    if precision == "fp16" and not torch.cuda.is_available():
        problems.append("train.precision=fp16 needs a GPU (DeepSpeed's CPU backend has no fp16 "
                        "loss scaling); use bf16 or fp32 on the CPU")
    ds.setdefault("steps_per_print", 1 << 30)  # we log ourselves
    ds.setdefault("wall_clock_breakdown", False)
    return ds, problems


def zero_stage(ds: dict) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no weight decay on biases and LayerNorm weights (BERT recipe)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "LayerNorm" in name or "layer_norm" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_engine(module: torch.nn.Module, ds_config: dict, weight_decay: float, lr_schedule):
    """AdamW is torch's own (fused), handed to DeepSpeed: its bias correction is computed from
    the saved step count, so a resumed run updates bit-identically. (DeepSpeed's CPU Adam advances
    beta^t by multiplication in C++ and recomputes it with pow() after a load: last-bit drift.)
    LAMB is DeepSpeed's fused kernel on GPUs, ours (launch/core/lamb.py) on the CPU. StableAdamW is
    torch-optimi's (ModernBERT's optimizer: AdamW with per-tensor update clipping; weight decay fully decoupled
    from the lr, applied as weight_decay x lr / peak lr, as ModernBERT's recipe). Other optimizer types in the
    JSON are left to DeepSpeed."""
    import deepspeed  # lazy: DeepSpeed picks its accelerator at import, after dist.init has set it up

    ds_config = dict(ds_config)
    opt_cfg = ds_config.get("optimizer", {})
    optimizer = None
    groups = param_groups(module, weight_decay)
    kind = str(opt_cfg.get("type", "")).lower()
    p = opt_cfg.get("params", {})
    if kind == "adamw":
        ds_config.pop("optimizer")
        # fused: one kernel over all tensors, on CUDA and (torch >= 2.4) on the CPU: ~5x faster steps there
        optimizer = torch.optim.AdamW(groups, lr=p["lr"], betas=tuple(p["betas"]), eps=p["eps"],
                                      weight_decay=weight_decay, fused=True)
    elif kind == "stableadamw":
        from optimi import StableAdamW  # lazy: optional dependency, only this optimizer needs it

        ds_config.pop("optimizer")
        optimizer = StableAdamW(groups, lr=p["lr"], betas=tuple(p["betas"]), eps=p["eps"], weight_decay=weight_decay,
                                decouple_lr=True, max_lr=p["lr"])
        ds_config["zero_allow_untested_optimizer"] = True  # ZeRO 1-2 step it on their flat fp32 partitions
    elif kind == "lamb" and not torch.cuda.is_available():  # DeepSpeed's FusedLamb is a CUDA kernel
        ds_config.pop("optimizer")
        optimizer = Lamb(groups, lr=p["lr"], betas=tuple(p["betas"]), eps=p["eps"], weight_decay=weight_decay)
    offload = ds_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    if optimizer is not None and offload not in ("none", None):
        # ZeRO-Offload then steps our optimizer on the CPU copy of the fp32 partitions (torch's fused AdamW runs
        # there): DeepSpeed refuses a client optimizer unless told so, and its own CPU Adam would cost bit-exact
        # resume (see above)
        ds_config["zero_force_ds_cpu_optimizer"] = False
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=module, model_parameters=None if optimizer else groups, optimizer=optimizer,
        config=ds_config, lr_scheduler=lr_schedule)
    _keep_fp32_clip_norm(engine)
    if engine.dp_world_size == 1 and not zero_stage(ds_config) and not (engine.bfloat16_enabled() or
                                                                      engine.fp16_enabled()):
        # One rank, no ZeRO, fp32: DeepSpeed would still flatten every gradient into buckets, "all-reduce" them
        # with itself, divide by 1 and copy them back each step (MiniLM on 2 CPU cores: 0.05 s of a 0.3 s
        # step). The result is the identity, so skipping it changes no bit.
        engine.enable_backward_allreduce = False
    return engine, optimizer, scheduler


def _keep_fp32_clip_norm(engine) -> None:
    """Without ZeRO / mixed precision DeepSpeed clips with clip_grad_norm_ but drops the norm it
    computes; keep it so get_global_grad_norm() reports it like in the other modes."""
    from deepspeed.runtime.utils import clip_grad_norm_  # lazy: as deepspeed in build_engine

    def clip():
        engine._global_grad_norm = clip_grad_norm_(parameters=engine.module.parameters(),
                                                   max_norm=engine.gradient_clipping(), mpu=engine.mpu)

    engine.clip_fp32_gradients = clip
