"""The MLM pretraining task: packed, masked streaming blocks in; eval loss / perplexity; final/ out."""

from __future__ import annotations

import json
import math
import time
from dataclasses import replace

import torch

from bertlaunch.core import dist
from bertlaunch.core.checkpoint import step_dir
from bertlaunch.core.export import export
from bertlaunch.core.layout import RunDir
from bertlaunch.core.metrics import arch_of, encoder_flops
from bertlaunch.core.plan import Plan
from bertlaunch.core.task import Ending, Resume
from bertlaunch.data.corpus.compressed import compression_of
from bertlaunch.data.corpus.reader import file_sizes, resolve_files
from bertlaunch.data.mlm.batches import MLMDataset, MLMSettings, initial_states, make_loader
from bertlaunch.data.mlm.mixture import MixtureState, replan_mixture
from bertlaunch.data.mlm.stream import StreamState, replan
from bertlaunch.model.build import refresh_rope, set_rope_bases
from bertlaunch.tasks.mlm.config import PretrainConfig
from bertlaunch.tasks.mlm.corpus import Corpus


class MLMTask:
    keeps_best = False  # pretraining keeps the newest checkpoints, not a best one

    def __init__(self, cfg: PretrainConfig, info, spec, corpus: Corpus, hf_config, plan: Plan, resume: Resume,
                 module=None):
        self.cfg, self.info, self.spec, self.module = cfg, info, spec, module
        self.sparse = module.sparse if module is not None else cfg.model.sparse_mlm_head  # a head it knows
        self.isolate = cfg.data.isolate_documents
        self.run_dir = RunDir(cfg.output_dir)
        self.arch = arch_of(hf_config)
        self.total_steps = plan.total_steps
        self.eval_every = cfg.eval.every
        self.workers = max(cfg.data.num_workers, 1)
        self.settings = MLMSettings.from_config(cfg)
        self.files, self.sizes = corpus.files, corpus.sizes
        self.sources = corpus.sources  # a weighted mixture (data.sources): list[data.mlm.mixture.Source]
        r, w = info.rank, self.workers
        if resume.saved is None:
            states, self.rotation = initial_states(r, info.world_size, w, self.sources), 0
        else:
            all_states = resume.saved["streams"]
            if resume.resplit:  # another world size / worker count: re-split the unread rest
                all_states, self.rotation = self._replan(all_states, info.world_size * w), 0
            else:
                self.rotation = resume.saved["rotation"]
            states = all_states[r * w:(r + 1) * w]
        self.states = list(states)
        self.phase, self.loader = None, None  # set_phase builds the loader before the first batch
        self.batches_seen = 0
        self.replaced = 0
        self.dropped = 0  # tokens of epoch tails dropped by data.last_block=drop (this rank)
        self.audit_file = None
        if cfg.data.audit:
            self.run_dir.audit.mkdir(parents=True, exist_ok=True)
            self.audit_file = open(self.run_dir.audit / f"rank_{r:05d}.jsonl", "a", buffering=1)
            # one id per attempt, the same on all ranks: later attempts (resumes) supersede earlier ones
            self.attempt = dist.all_gather_object(time.time())[0]
        self.eval_batches = None
        self.device = dist.device()

    def _replan(self, all_states: list[dict], n: int) -> list[dict]:
        """The saved streams' unread rest over n streams; a started compressed file stays with one stream."""
        if self.sources:
            units = {src.name: frozenset(i for i, f in enumerate(src.files) if compression_of(f))
                     for src in self.sources}
            new = replan_mixture([MixtureState.from_dict(s) for s in all_states], self.sources, n, units)
        else:
            units = frozenset(i for i, f in enumerate(self.files) if compression_of(f))
            new = replan([StreamState.from_dict(s) for s in all_states], self.sizes, n, units)
        return [s.to_dict() for s in new]

    # -- training data -----------------------------------------------------------------------------
    def set_phase(self, phase) -> None:
        """Blocks of the phase's length and micro-batches of its size from the consumed position on: the
        same as a resume at this step with the phase's settings, so a run that crosses a phase boundary
        and one resumed after it read the same tokens."""
        self.phase = phase
        self.settings = replace(self.settings, block_size=phase.block_size, micro_batch_size=phase.micro,
                                mlm_probability=phase.settings.get("mlm_probability", self.cfg.data.mlm_probability))
        hf = getattr(self.module, "hf", None)
        if hf is not None and set_rope_bases(hf.config, phase.settings.get("rope_theta"), None,
                                             f"train.phases[{phase.index}].rope_theta"):
            refresh_rope(hf)  # a new RoPE base from this phase on (a context extension)
        self.rotation, self.batches_seen = (self.rotation + self.batches_seen) % self.workers, 0
        self.dataset = MLMDataset(self.files, self.sizes, self.spec, self.settings, list(self.states), self.rotation,
                                  cache=self.cfg.data.cache, sources=self.sources)
        self.loader = make_loader(self.dataset, self.cfg.data.num_workers)

    def batches(self):
        while True:
            loader = self.loader
            for batch in loader:
                if loader is not self.loader:  # a new phase: batches the old loader prefetched are not trained
                    break
                if batch["meta"]["n_blocks"] == 0:  # only a dropped epoch tail: keep its position, train nothing
                    self.consumed(batch, None)
                    continue
                yield batch

    def consumed(self, batch, step) -> None:
        meta = batch["meta"]
        state = meta["state"]
        self.states[state["stream"] - self.info.rank * self.workers] = state
        self.batches_seen += 1
        self.replaced = max(self.replaced, meta.get("replaced_bytes", 0))
        self.dropped += meta["dropped"]
        if self.audit_file is not None and meta["audit"]:
            self.audit_file.write(json.dumps({"attempt": self.attempt, "step": step, "docs": meta["audit"],
                                              "dropped": meta["dropped"] > 0}) + "\n")

    def data_state(self) -> dict:
        """Every stream's position (gathered from all ranks) + the worker rotation to continue with."""
        gathered = dist.all_gather_object(self.states)
        streams = sorted((s for rank_states in gathered for s in rank_states), key=lambda s: s["stream"])
        return {"streams": streams, "workers": self.workers, "files": self.files, "sizes": self.sizes,
                "mixture": [[src.name, src.weight] for src in self.sources] if self.sources else None,
                "rotation": (self.rotation + self.batches_seen) % self.workers}

    def to_device(self, batch) -> dict:
        full = batch["meta"]["n_real"] == batch["meta"]["n_slots"]
        keys = ("input_ids", "mlm_rows", "mlm_targets") if self.sparse else ("input_ids", "labels")
        out = {k: batch[k].to(self.device, non_blocking=True) for k in keys}
        if self.isolate:  # each document attends to itself only: pads are a sequence of their own, no mask needed
            out["doc_starts"] = batch["doc_starts"].to(self.device, non_blocking=True)
            out["max_doc_len"] = batch["meta"]["max_doc_len"]
        elif not full:  # packed blocks are all real tokens: no mask lets SDPA take its fastest kernel
            out["attention_mask"] = batch["attention_mask"].to(self.device, non_blocking=True)
        return out

    def forward(self, engine, batch):
        return engine(**self.to_device(batch))

    def null_batch(self):
        ids = torch.full((1, 8), self.spec.pad_id, dtype=torch.long)
        return {"input_ids": ids, "labels": torch.full_like(ids, -100), "attention_mask": torch.ones_like(ids),
                "mlm_rows": torch.zeros(1, dtype=torch.long), "mlm_targets": torch.full((1,), -100),
                "doc_starts": torch.zeros(1, dtype=torch.long),
                "meta": {"n_real": 8, "n_slots": 8, "n_masked": 0, "max_doc_len": 8}}

    def counts(self, batch) -> dict:
        m = batch["meta"]
        masked = m["n_masked"]
        return {"real_tokens": m["n_real"], "slots": m["n_slots"], "sequences": m["n_blocks"],
                "masked": masked, "head_rows": masked if self.sparse else m["n_slots"]}

    def flops(self, c: dict) -> float:
        return encoder_flops(**self.arch, seq=self.settings.block_size, tokens=c.get("slots", 0),
                             head_rows=c.get("head_rows", 0))

    def log_extra(self, totals: dict) -> dict:
        """Data position (collective): lowest epoch in flight, documents started, bytes replaced, and the
        packing efficiency (corpus tokens that reached a trained block, vs dropped tails)."""
        docs, replaced, dropped = dist.all_reduce([float(sum(s["docs"] for s in self.states)),
                                                   float(self.replaced), float(self.dropped)], "sum", host=True)
        epoch = dist.all_reduce([float(min(s["epoch"] for s in self.states))], "min", host=True)[0]
        trained = totals["tokens"]
        out = {"epoch": int(epoch), "documents": int(docs), "replaced_bytes": int(replaced),
               "packing_efficiency": trained / max(trained + dropped, 1), "phase": self.phase.index,
               "block_size": self.settings.block_size}
        if self.sources:  # real tokens trained from each source (all ranks, all attempts) and its epoch
            names = [src.name for src in self.sources]
            tokens = dist.all_reduce([float(sum(st["tokens"][n] for st in self.states)) for n in names], "sum",
                                     host=True)
            epochs = dist.all_reduce([float(min(st["sources"][n]["epoch"] for st in self.states)) for n in names],
                                     "min", host=True)
            out["tokens_by_source"] = {n: int(t) for n, t in zip(names, tokens)}
            out["epoch_by_source"] = {n: int(e) for n, e in zip(names, epochs)}
        return out

    # -- evaluation ------------------------------------------------------------------------------
    def evaluate(self, engine) -> dict:
        """eval_loss over data.eval_files; with a mixture also eval_loss/<name> over each source's eval_files
        (eval_loss is then their pooled loss when data.eval_files is empty)."""
        out, pooled = {}, [0.0, 0.0]
        for name, batches in self._eval_sets().items():
            n_max = int(dist.all_reduce([float(len(batches))], "max")[0])
            loss_sum, n_masked = 0.0, 0
            for i in range(n_max):  # every rank runs n_max forwards: ZeRO-3 gathers weights collectively
                batch = batches[i] if i < len(batches) else self.null_batch()
                loss = engine(**self.to_device(batch))
                k = batch["meta"]["n_masked"]
                loss_sum += float(loss) * k
                n_masked += k
            loss_sum, n_masked = dist.all_reduce([loss_sum, float(n_masked)], "sum")
            if name:
                out[f"eval_loss/{name}"] = loss_sum / max(n_masked, 1)
            if not name or not self.cfg.data.eval_files:
                pooled = [pooled[0] + loss_sum, pooled[1] + n_masked]
        if not pooled[1]:
            return out
        eval_loss = pooled[0] / pooled[1]
        return {"eval_loss": eval_loss, "perplexity": math.exp(min(eval_loss, 50.0)),
                "eval_masked_tokens": int(pooled[1]), **out}

    def _eval_sets(self) -> dict[str, list]:
        """The rank's share of each eval set ('' = data.eval_files, else a source's name), masked
        deterministically; tokenized once and kept."""
        if self.eval_batches is None:
            d = self.cfg.data
            sets = {"": (d.eval_files, d.txt_documents, d.text_field)} if d.eval_files else {}
            for src in d.sources:
                if src.eval_files:
                    sets[src.name] = (src.eval_files, src.txt_documents or d.txt_documents,
                                      src.text_field or d.text_field)
            self.eval_batches = {name: self._eval_batches(*v) for name, v in sets.items()}
        return self.eval_batches

    def _eval_batches(self, patterns: list[str], mode: str, text_field: str) -> list:
        files = resolve_files(patterns)
        d = self.cfg.data
        eval_settings = MLMSettings.from_config(self.cfg, audit=False, mode=mode, text_field=text_field,
                                                micro_batch_size=self.cfg.eval.micro_batch_size
                                                or self.cfg.train.micro_batch_size,
                                                mlm_probability=d.eval_mlm_probability or d.mlm_probability)
        ds = MLMDataset(files, file_sizes(files), self.spec, eval_settings,
                        initial_states(self.info.rank, self.info.world_size, 1), finite=True)
        limit, batches = self.cfg.eval.max_batches, []
        for batch in ds:
            if limit is not None and len(batches) >= limit:
                break
            if batch["meta"]["n_blocks"]:
                batches.append(batch)
        return batches

    def track_best(self, state, result) -> bool:
        better = state.best_metric is None or result["eval_loss"] < state.best_metric
        if better:
            state.best_metric, state.best_step = result["eval_loss"], state.step
        return better

    def finish(self, end: Ending) -> None:
        """output_dir/final: the last checkpoint exported to Hugging Face format by rank 0, alone (no
        collective follows: the other ranks are done and do not wait for it)."""
        if self.audit_file is not None:
            self.audit_file.close()
        ckpt = step_dir(end.checkpoints, end.state.step)
        if self.info.is_main and ckpt.is_dir():
            export(ckpt, self.run_dir.final)
            end.log(f"final model: {self.run_dir.final}")
