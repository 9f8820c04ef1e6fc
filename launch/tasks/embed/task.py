"""The embedding task: global batches of (query, positive[, negative]) rows in, InfoNCE over the global batch
(launch/tasks/embed/loss.py); nDCG@10 / Recall@100 / MRR@10 on a BEIR set out; the best checkpoint by nDCG@10 and a
sentence-transformers folder at the end."""

from __future__ import annotations

import json

import numpy as np
import torch

from bertlaunch.core import dist
from bertlaunch.core.checkpoint import DS_TAG, step_dir
from bertlaunch.core.export import export
from bertlaunch.core.layout import RunDir
from bertlaunch.core.metrics import arch_of, encoder_flops
from bertlaunch.core.plan import Plan
from bertlaunch.core.task import Ending, Resume
from bertlaunch.data.tables.pairs import epoch_order, split_global
from bertlaunch.data.tables.triples import collate_rows
from bertlaunch.tasks.embed.config import EmbedConfig
from bertlaunch.tasks.embed.data import EmbedData
from bertlaunch.tasks.embed.loss import GradCache, plain_loss
from bertlaunch.tasks.embed.retrieval import score, table

METRIC = "ndcg@10"  # picks the best checkpoint


def to_device(x, device):
    """Tensors, and lists/tuples/dicts of them, on `device`."""
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, dict):
        return {k: to_device(v, device) for k, v in x.items()}
    return type(x)(to_device(v, device) for v in x)


def encode_batch(forward, batch: dict, device) -> torch.Tensor:
    """[cols * n, H] embeddings of a micro-batch's texts (one pad text when n = 0): its inputs (padded length groups
    or packed texts, data/tables/triples.py collate_rows) encoded by one call of `forward` (the engine), the rows put
    back in column order."""
    emb = forward(**to_device(batch["inputs"], device))
    restore = batch["restore"]
    return emb if restore is None else emb.index_select(0, restore.to(device, non_blocking=True))


class EmbedTask:
    def __init__(self, cfg: EmbedConfig, info, data: EmbedData, hf_config, p: Plan, resume: Resume, packed: bool):
        self.cfg, self.info, self.d, self.packed = cfg, info, data, packed
        self.arch = arch_of(hf_config)
        self.micro, self.accum, self.world = p.phases[0].micro, p.accum, info.world_size
        self.global_batch, self.steps_per_epoch, self.total_steps = p.global_batch, p.steps_per_epoch, p.total_steps
        self.eval_every = cfg.eval.every or self.steps_per_epoch
        self.keeps_best = cfg.eval.save_best and data.eval is not None
        self.cols = len(data.train.texts)
        self.start_step = resume.step
        self.device, self._orders, self.cache = dist.device(), {}, None

    # -- training data ---------------------------------------------------------------------------
    def global_batches(self, epoch: int) -> list[np.ndarray]:
        """The epoch's global batches (shuffled rows): a function of (seed, epoch) only."""
        if epoch not in self._orders:
            self._orders = {epoch: epoch_order(self.d.train.lengths, self.global_batch, self.cfg.train.seed, epoch,
                                               False)}
        return self._orders[epoch]

    def batches(self):
        """This rank's micro-batches from the resumed step on (a seek, not a replay). Each carries the rows every
        rank holds in its slot (the gathers' sizes, known to all without a collective); with task.grad_cache each
        also carries all of this rank's micro-batches of the step, which the first one embeds."""
        step = self.start_step
        while True:
            epoch, k = divmod(step, self.steps_per_epoch)
            gb = self.global_batches(epoch)[k]
            parts = split_global(gb, self.micro, self.world, self.accum)  # [rank][slot] -> rows
            chunks = [collate_rows(self.d.train, idx, self.cfg.task.length_groups, self.packed)
                      for idx in parts[self.info.rank]]
            share = [sum(len(x) for x in mine) for mine in parts]
            for a, chunk in enumerate(chunks):
                chunk["meta"] |= {"step": step, "slot": a, "n_step": len(gb), "share": share,
                                  "counts": [len(parts[r][a]) for r in range(self.world)]}
                if self.cfg.task.grad_cache:
                    chunk["meta"]["chunks"] = chunks
                yield chunk
            step += 1

    def set_phase(self, phase) -> None:
        pass  # one phase: the plan's batch arithmetic, which the task already follows

    def consumed(self, batch, step) -> None:
        pass  # the position is the step count itself

    def encode(self, engine, batch) -> torch.Tensor:
        return encode_batch(engine, batch, self.device)

    def forward(self, engine, batch):
        m, t = batch["meta"], self.cfg.task
        if m.get("null"):  # a stand-in for a dropped micro-batch: every rank takes it at once, no collective
            return self.encode(engine, batch).sum() * 0.0
        if not t.grad_cache:
            scale = self.world * self.accum / m["n_step"]
            return plain_loss(self.encode(engine, batch)[:self.cols * m["n"]], m["counts"], self.info.rank,
                              self.cols, t.temperature, scale)
        if m["slot"] == 0:  # the step's first micro-batch: embed them all, take the loss and its gradients
            self.cache = GradCache(lambda chunk: self.encode(engine, chunk), m["chunks"], m["share"], self.info.rank,
                                   self.cols, t.temperature, m["n_step"], self.world, self.accum)
        return self.cache.loss(m["slot"])

    def null_batch(self):
        batch = collate_rows(self.d.train, np.zeros(1, dtype=np.int64), packed=self.packed)
        batch["meta"]["null"] = True
        return batch

    def counts(self, batch) -> dict:
        m = batch["meta"]
        return {"real_tokens": m["n_real"], "slots": m["n_slots"], "sequences": m["n"], "texts": m["texts"]}

    def flops(self, c: dict) -> float:
        seq = c.get("slots", 0) / max(c.get("texts", 1), 1)
        fwd_bwd = encoder_flops(**self.arch, seq=max(int(seq), 1), tokens=c.get("slots", 0), head_rows=0,
                                num_labels=0)
        return fwd_bwd * (4 / 3 if self.cfg.task.grad_cache else 1)  # GradCache: one more forward (1 of 3 units)

    def log_extra(self, totals: dict) -> dict:
        return {"epoch": round(totals["step"] / self.steps_per_epoch, 3)}

    def data_state(self) -> dict:
        return {"workers": 1, "train_examples": [self.d.train.path, len(self.d.train)],
                "steps_per_epoch": self.steps_per_epoch}

    # -- evaluation ------------------------------------------------------------------------------
    def evaluate(self, engine) -> dict:
        if self.d.eval is None:
            return {}
        result = score(engine, self.d.eval, self.cfg.eval.micro_batch_size or self.micro, self.device)
        return {f"eval_{k}": v for k, v in result.items()}

    def track_best(self, state, result) -> bool:
        value = result[f"eval_{METRIC}"]
        better = state.best_metric is None or value > state.best_metric
        if better:
            state.best_metric, state.best_step, state.best_result = value, state.step, result
        return better

    def finish(self, end: Ending) -> None:
        """The best weights back in the engine (collective), then rank 0 alone writes eval_results.json, prints the
        table and exports final/ (a sentence-transformers folder); no collective follows."""
        cfg, state, engine = self.cfg, end.state, end.engine
        out = RunDir(cfg.output_dir)
        source = step_dir(end.checkpoints, state.step)
        if self.keeps_best and state.best_step is not None and state.best_step != state.step:
            source = step_dir(end.checkpoints, state.best_step)
            path, _ = engine.load_checkpoint(str(source / "ds"), tag=DS_TAG, load_module_only=True,
                                             load_optimizer_states=False, load_lr_scheduler_states=False)
            if path is None:
                raise RuntimeError(f"could not load the best checkpoint {source}")
        if not self.info.is_main:
            return
        results = {"best_step": state.best_step, "metric": METRIC, "best": state.best_result,
                   "final_step": state.step, "train_examples": len(self.d.train)}
        out.eval_results.write_text(json.dumps(results, indent=1))
        if state.best_result:
            best = {k.removeprefix("eval_"): v for k, v in state.best_result.items()}
            end.log(table(best, self.d.eval.beir, f"retrieval (best: step {state.best_step})"))
        if source.is_dir():
            export(source, out.final)
            end.log(f"final model (step {source.name}, a sentence-transformers folder): {out.final}")
