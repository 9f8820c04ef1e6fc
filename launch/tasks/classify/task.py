"""The classification / regression task (sentence pairs or single sentences): length-grouped global
batches in; accuracy, F1, Pearson, ... out; the best checkpoint, predictions and final/ at the end."""

from __future__ import annotations

import numpy as np
import torch

from bertlaunch.core import dist
from bertlaunch.core.metrics import arch_of, encoder_flops
from bertlaunch.core.plan import Plan
from bertlaunch.core.task import Ending, Resume
from bertlaunch.data.tables.load import TaskData
from bertlaunch.data.tables.pairs import collate, epoch_order, split_global
from bertlaunch.tasks.classify.config import FinetuneConfig
from bertlaunch.tasks.classify.outputs import finish_finetune
from bertlaunch.tasks.classify.scores import default_metric, task_metrics


class ClassifyTask:
    def __init__(self, cfg: FinetuneConfig, info, data: TaskData, hf_config, p: Plan, resume: Resume):
        self.cfg, self.info, self.d, self.accum = cfg, info, data, p.accum
        self.arch, self.num_labels = arch_of(hf_config), data.labels.num_labels
        self.regression = data.labels.kind == "regression"
        self.micro, self.world = p.phases[0].micro, info.world_size  # the micro-batch fitted to this world size
        self.global_batch = p.global_batch
        self.steps_per_epoch = p.steps_per_epoch
        self.total_steps = p.total_steps
        self.eval_every = cfg.eval.every or self.steps_per_epoch
        self.keeps_best = cfg.eval.save_best
        self.metric = cfg.eval.metric or default_metric(data.labels.kind, self.num_labels)
        self.start_step = resume.step
        self.device, self._orders = dist.device(), {}

    # -- training data ---------------------------------------------------------------------------
    def global_batches(self, epoch: int) -> list[np.ndarray]:
        """The epoch's global batches: a function of (seed, epoch) only, cached for the current epoch."""
        if epoch not in self._orders:
            self._orders = {epoch: epoch_order(self.d.train.lengths, self.global_batch, self.cfg.train.seed, epoch,
                                               self.cfg.task.length_grouping, self.cfg.task.group_factor)}
        return self._orders[epoch]

    def batches(self):
        """This rank's micro-batches, starting at the resumed step: a seek, not a replay."""
        step = self.start_step
        while True:
            epoch, k = divmod(step, self.steps_per_epoch)
            gb = self.global_batches(epoch)[k]
            for idx in split_global(gb, self.micro, self.world, self.accum)[self.info.rank]:
                yield self._collate(self.d.train, idx, n_step=len(gb))
            step += 1

    def _collate(self, enc, idx, n_step=None):
        return collate(enc, np.asarray(idx, dtype=np.int64), self.d.pad_id, self.regression,
                       self.cfg.task.pad_to_multiple_of, n_step, self.cfg.task.unpad)

    def set_phase(self, phase) -> None:
        pass  # one phase: the plan's batch arithmetic, which the task already follows

    def consumed(self, batch, step) -> None:
        pass  # the position is the step count itself

    def to_device(self, batch, with_labels=True) -> dict:
        packed = "offsets" in batch  # task.unpad: model/unpadded.py
        keys = ("input_ids", "token_type_ids") + (("position_ids", "offsets") if packed else ("attention_mask",))
        out = {k: batch[k].to(self.device, non_blocking=True) for k in keys + (("labels",) if with_labels else ())}
        if packed:
            out["max_len"] = batch["meta"]["max_len"]
        if not with_labels:
            return out
        n = batch["meta"]["n"]
        if n == 0:  # an empty slot of a short last global batch: zero contribution
            out["labels"] = torch.zeros(1, dtype=out["labels"].dtype, device=self.device)
        out["weight"] = self.world * self.accum / batch["meta"]["n_step"] if n else 0.0
        return out

    def forward(self, engine, batch):
        return engine(**self.to_device(batch))

    def null_batch(self):
        return self._collate(self.d.train, np.zeros(0, dtype=np.int64), n_step=1)

    def counts(self, batch) -> dict:
        m = batch["meta"]
        return {"real_tokens": m["n_real"], "slots": m["n_slots"], "sequences": m["n"], "head_rows": m["n"]}

    def flops(self, c: dict) -> float:
        seq = c.get("slots", 0) / max(c.get("sequences", 1), 1)
        return encoder_flops(**self.arch, seq=max(int(seq), 1), tokens=c.get("slots", 0),
                             head_rows=c.get("head_rows", 0), num_labels=self.num_labels)

    def log_extra(self, totals: dict) -> dict:
        return {"epoch": round(totals["step"] / self.steps_per_epoch, 3)}

    def data_state(self) -> dict:
        return {"workers": 1, "train_examples": [self.d.train_path, len(self.d.train)],
                "steps_per_epoch": self.steps_per_epoch}

    # -- evaluation and prediction ---------------------------------------------------------------
    def predict(self, engine, enc) -> tuple[np.ndarray, np.ndarray]:
        """Logits for every example of `enc` (sharded over ranks, gathered) -> (logits [N, C], order)."""
        order = np.argsort(enc.lengths, kind="stable")
        bs = self.cfg.eval.micro_batch_size or self.micro
        chunks = [order[i:i + bs] for i in range(0, len(order), bs)][self.info.rank::self.world]
        n_max = int(dist.all_reduce([float(len(chunks))], "max")[0])
        mine = []
        for i in range(n_max):  # equal forward counts on every rank (ZeRO-3 gathers weights collectively)
            idx = chunks[i] if i < len(chunks) else order[:1]
            batch = self._collate(enc, idx)
            logits = engine(**self.to_device(batch, with_labels=False)).float().cpu().numpy()
            if i < len(chunks):
                mine += list(zip(idx.tolist(), logits.tolist()))
        gathered = sorted((x for part in dist.all_gather_object(mine) for x in part), key=lambda x: x[0])
        return np.array([x[1] for x in gathered], dtype=np.float64)

    def scores(self, logits: np.ndarray, gold: np.ndarray, prefix: str) -> dict:
        if self.regression:
            pred = logits[:, 0]
            loss = float(((pred - gold) ** 2).mean())
        else:
            z = logits - logits.max(1, keepdims=True)
            logp = z - np.log(np.exp(z).sum(1, keepdims=True))
            pred = logp.argmax(1)
            loss = float(-logp[np.arange(len(gold)), gold.astype(np.int64)].mean())
        out = {"loss": loss, **task_metrics(self.d.labels.kind, self.num_labels, pred, gold)}
        return {f"{prefix}_{k}": v for k, v in out.items()}

    def evaluate(self, engine) -> dict:
        if self.d.eval is None:
            return {}
        out = self.scores(self.predict(engine, self.d.eval), self.d.eval.labels, "eval")
        for name, enc in self.d.extra_eval.items():  # e.g. MNLI's mismatched dev set: eval_mm_accuracy
            out |= self.scores(self.predict(engine, enc), enc.labels, f"eval_{name}")
        return out

    def track_best(self, state, result) -> bool:
        key = self.metric if self.metric == "eval_loss" else f"eval_{self.metric}"
        value = result[key]
        better = state.best_metric is None or (value < state.best_metric if key in ("eval_loss", "eval_mse")
                                               else value > state.best_metric)
        if better:
            state.best_metric, state.best_step = value, state.step
            state.best_result = result
        return better

    def finish(self, end: Ending) -> None:
        finish_finetune(self, end)

