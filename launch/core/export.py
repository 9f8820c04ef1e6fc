"""Export a checkpoint to a Hugging Face model folder (the library half; `bertlaunch export` is the command): a masked
LM, a sequence classifier, or an encoder with the sentence-transformers files its task wrote (the embedding task).

Works for every ZeRO stage without GPUs or a process group: the fp32 master weights are gathered from
the per-rank partitions on disk (DeepSpeed's zero_to_fp32), or read from the model file for stage 0.
The checkpoint's manifest is verified first: DeepSpeed's files need full unpickling, so only files we
wrote and can account for are opened that way.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, AutoModelForSequenceClassification

from bertlaunch.core import hooks
from bertlaunch.core.checkpoint import DS_TAG, verify
from bertlaunch.core.layout import HF_META


class ExportError(ValueError):
    """The checkpoint cannot be exported; the message says why."""


def gathered_state_dict(ckpt: Path) -> dict[str, torch.Tensor]:
    """fp32 weights of the wrapped model (keys as in our training module, e.g. 'hf.bert...')."""
    ds_dir = ckpt / "ds"
    tag_dir = ds_dir / DS_TAG
    optim_files = list(tag_dir.glob("*optim_states.pt"))
    if optim_files and not any(f.name.startswith("bf16_") for f in optim_files):
        # deepspeed picks its accelerator when imported, which must follow dist.prepare_env in a run
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint  # lazy: see above

        try:
            merged = get_fp32_state_dict_from_zero_checkpoint(str(ds_dir), tag=DS_TAG)
        except ValueError as e:
            if "not a zero checkpoint" not in str(e):
                raise
        else:
            return _with_frozen(merged, tag_dir)
    model_file = tag_dir / "mp_rank_00_model_states.pt"
    state = torch.load(model_file, map_location="cpu", weights_only=False)  # our own, verified file
    fp32 = _bf16_optimizer_masters(tag_dir, state)
    return fp32 if fp32 is not None else {k: v.float() for k, v in state["module"].items()}


def _with_frozen(merged: dict, tag_dir: Path) -> dict:
    """ZeRO 1 leaves frozen parameters (requires_grad=False, e.g. an embedding model's unused pooler) out of its
    optimizer partitions and out of the merge; its model states file holds them whole (ZeRO 2 and 3 save them for
    the merge)."""
    model_file = tag_dir / "mp_rank_00_model_states.pt"  # ZeRO 3 names its files per rank
    if not model_file.is_file():
        return merged
    state = torch.load(model_file, map_location="cpu", weights_only=False)  # our own, verified file
    for name, tensor in state["module"].items():
        if name not in merged and tensor.numel():
            merged[name] = tensor.float()
    return merged


def _bf16_optimizer_masters(tag_dir: Path, state: dict):
    """Stage 0 with bf16 keeps fp32 masters in bf16_zero_pp_rank_*: reassemble them when present."""
    files = sorted(tag_dir.glob("bf16_zero_pp_rank_*_optim_states.pt"),
                   key=lambda p: int(p.name.split("_")[4]))
    if not files:
        return None
    parts = [torch.load(f, map_location="cpu", weights_only=False)["optimizer_state_dict"] for f in files]
    groups = [torch.cat([p["single_partition_of_fp32_groups"][g] for p in parts])
              for g in range(len(parts[0]["single_partition_of_fp32_groups"]))]
    shapes = state["param_shapes"]  # list (per group) of {name: shape}, in flattening order
    out = {}
    for flat, group in zip(groups, shapes):
        offset = 0
        for name, shape in group.items():
            n = int(torch.Size(shape).numel())
            out[name] = flat[offset: offset + n].view(shape).clone()
            offset += n
    for name, tensor in state["module"].items():  # buffers and tied duplicates
        out.setdefault(name, tensor.float())
    return out


def export(ckpt: str | Path, out: str | Path, *, verify_manifest: bool = True) -> Path:
    """Write the checkpoint's fp32 weights, config and tokenizer as a Hugging Face folder `out`; ExportError
    when the checkpoint is incomplete or not ours."""
    ckpt, out = Path(ckpt), Path(out)
    if hooks.installed is not None:  # tests only: a long export (BERT-large)
        hooks.installed.exporting()
    if verify_manifest:
        reason = verify(ckpt)
        if reason:
            raise ExportError(f"{ckpt} is not a complete checkpoint ({reason})")
    meta = ckpt / HF_META
    if not (meta / "config.json").is_file():
        raise ExportError(f"{ckpt} has no {HF_META}/config.json (not written by this launcher)")
    config = AutoConfig.from_pretrained(meta)
    task = json.loads((meta / "task.json").read_text()) if (meta / "task.json").is_file() else {}
    cls = {"classification": AutoModelForSequenceClassification, "embedding": AutoModel}.get(task.get("kind"),
                                                                                         AutoModelForMaskedLM)
    model = cls.from_config(config)
    state = {k.removeprefix("hf."): v for k, v in gathered_state_dict(ckpt).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied and not k.endswith("decoder.weight")]
    if missing or unexpected:
        raise ExportError(f"{ckpt}: the weights do not match the model: missing {missing[:5]}, "
                          f"unexpected {unexpected[:5]}")
    model.tie_weights()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    for f in meta.rglob("*"):  # tokenizer files, task.json (and a sentence-transformers layout) travel with the model
        if f.is_file() and f.relative_to(meta) != Path("config.json"):
            (out / f.relative_to(meta)).parent.mkdir(parents=True, exist_ok=True)
            (out / f.relative_to(meta)).write_bytes(f.read_bytes())
    return out

