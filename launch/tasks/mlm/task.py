"""The MLM pretraining task: packed, masked streaming blocks in; eval loss / perplexity; final/ out."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from launch.core import configlib, dist
from launch.core.checkpoint import step_dir
from launch.core.metrics import arch_of, encoder_flops
from launch.core.session import Session
from launch.tasks.mlm.config import PretrainConfig


class MLMTask:
    keeps_best = False  # pretraining keeps the newest checkpoints, not a best one

    def __init__(self, cfg: PretrainConfig, info, spec, hf_config, session: Session):
        from data.mlm import MLMSettings, initial_states
        from data.sources import file_sizes, resolve_files
        from data.stream import StreamState, replan

        self.cfg, self.info, self.spec, self.sparse = cfg, info, spec, cfg.model.sparse_mlm_head
        self.arch = arch_of(hf_config)
        self.total_steps = session.plan.total_steps
        self.eval_every = cfg.eval.every
        self.workers = max(cfg.data.num_workers, 1)
        d = cfg.data
        self.settings = MLMSettings.from_config(cfg)
        if d.cache:  # a token cache from `python -m launch.tools.prepare`: shards play the role of files
            from data.cache import check_tokenizer, read_meta, shard_names_and_sizes

            check_tokenizer(read_meta(d.cache), spec, d.cache)
            self.files, self.sizes = shard_names_and_sizes(d.cache)
        else:
            self.files = resolve_files(d.train_files)
            self.sizes = file_sizes(self.files)
        saved = session.saved
        r, w = info.rank, self.workers
        self._check_streams(info.world_size * w)
        if saved is None:
            states, self.rotation = initial_states(r, info.world_size, w), 0
        else:
            if saved["files"] != self.files or saved["sizes"] != self.sizes:
                raise configlib.ConfigError([f"data.train_files changed since {session.resume_from}: the "
                                             "files or their sizes differ, so the saved positions are "
                                             "meaningless; restore the files or start a new output_dir"])
            all_states = saved["streams"]
            if session.resized:  # another world size / worker count: re-split the unread rest
                from data.compressed import compression_of

                units = frozenset(i for i, f in enumerate(self.files) if compression_of(f))  # read whole
                new = replan([StreamState.from_dict(s) for s in all_states], self.sizes, info.world_size * w, units)
                all_states, self.rotation = [s.to_dict() for s in new], 0
            else:
                self.rotation = saved["rotation"]
            states = all_states[r * w:(r + 1) * w]
        self.states = list(states)
        self.phase, self.loader = None, None  # set_phase builds the loader before the first batch
        self.batches_seen = 0
        self.replaced = 0
        self.dropped = 0  # tokens of epoch tails dropped by data.last_block=drop (this rank)
        self.audit_file = None
        if d.audit:
            (Path(cfg.output_dir) / "audit").mkdir(parents=True, exist_ok=True)
            self.audit_file = open(Path(cfg.output_dir) / "audit" / f"rank_{r:05d}.jsonl", "a", buffering=1)
            # one id per attempt, the same on all ranks: later attempts (resumes) supersede earlier ones
            self.attempt = dist.all_gather_object(time.time())[0]
        self.eval_batches = None
        self.device = dist.device()

    def _check_streams(self, n: int) -> None:
        from data.sources import DataError
        from data.stream import empty_streams, text_readers

        if sum(self.sizes) == 0:
            raise DataError(f"data.train_files: every file is empty ({', '.join(self.files)})")
        if self.cfg.data.cache:
            from data.cache import cache_readers

            readers = cache_readers(self.cfg.data.cache)
        else:
            d = self.cfg.data
            readers = text_readers(self.files, d.txt_documents, d.text_field, d.max_chunk_bytes, d.encoding_errors)
        empty = empty_streams(readers, self.sizes, n)
        if empty:
            from data.compressed import compression_of

            packed = sum(1 for f in self.files if compression_of(f))
            why = (f"compressed files are read whole, one stream each, and {packed} of the {len(self.files)} "
                   "file(s) are compressed" if packed else "the corpus is too small to split that many ways")
            raise DataError(f"{len(empty)} of {n} data streams (world_size x data.num_workers) would get no "
                            f"document: {why} (streams {empty[:8]}); lower data.num_workers, use fewer ranks, "
                            "add data" + (", or build a token cache, which splits compressed files evenly: "
                                          "python -m launch.tools.prepare" if packed else ""))

    # -- training data -----------------------------------------------------------------------------
    def set_phase(self, phase) -> None:
        """Blocks of the phase's length and micro-batches of its size from the consumed position on: the
        same as a resume at this step with the phase's settings, so a run that crosses a phase boundary
        and one resumed after it read the same tokens."""
        from dataclasses import replace

        from data.mlm import MLMDataset, make_loader

        self.phase = phase
        self.settings = replace(self.settings, block_size=phase.block_size, micro_batch_size=phase.micro)
        self.rotation, self.batches_seen = (self.rotation + self.batches_seen) % self.workers, 0
        self.dataset = MLMDataset(self.files, self.sizes, self.spec, self.settings, list(self.states), self.rotation,
                                  cache=self.cfg.data.cache)
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
                "rotation": (self.rotation + self.batches_seen) % self.workers}

    def to_device(self, batch) -> dict:
        full = batch["meta"]["n_real"] == batch["meta"]["n_slots"]
        keys = ("input_ids", "mlm_rows", "mlm_targets") if self.sparse else ("input_ids", "labels")
        out = {k: batch[k].to(self.device, non_blocking=True) for k in keys}
        if not full:  # packed blocks are all real tokens: no mask lets SDPA take its fastest kernel
            out["attention_mask"] = batch["attention_mask"].to(self.device, non_blocking=True)
        return out

    def forward(self, engine, batch):
        return engine(**self.to_device(batch))

    def null_batch(self):
        ids = torch.full((1, 8), self.spec.pad_id, dtype=torch.long)
        return {"input_ids": ids, "labels": torch.full_like(ids, -100), "attention_mask": torch.ones_like(ids),
                "mlm_rows": torch.zeros(1, dtype=torch.long), "mlm_targets": torch.full((1,), -100),
                "meta": {"n_real": 8, "n_slots": 8, "n_masked": 0}}

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
        return {"epoch": int(epoch), "documents": int(docs), "replaced_bytes": int(replaced),
                "packing_efficiency": trained / max(trained + dropped, 1), "phase": self.phase.index,
                "block_size": self.settings.block_size}

    # -- evaluation ------------------------------------------------------------------------------
    def evaluate(self, engine) -> dict:
        if not self.cfg.data.eval_files:
            return {}
        batches = self._eval_batches()
        n_max = int(dist.all_reduce([float(len(batches))], "max")[0])
        loss_sum, n_masked = 0.0, 0
        for i in range(n_max):  # every rank runs n_max forwards: ZeRO-3 gathers weights collectively
            batch = batches[i] if i < len(batches) else self.null_batch()
            loss = engine(**self.to_device(batch))
            k = batch["meta"]["n_masked"]
            loss_sum += float(loss) * k
            n_masked += k
        loss_sum, n_masked = dist.all_reduce([loss_sum, float(n_masked)], "sum")
        eval_loss = loss_sum / max(n_masked, 1)
        return {"eval_loss": eval_loss, "perplexity": math.exp(min(eval_loss, 50.0)),
                "eval_masked_tokens": int(n_masked)}

    def _eval_batches(self) -> list:
        """The rank's share of the eval set, masked deterministically; tokenized once and kept."""
        if self.eval_batches is None:
            from data.mlm import MLMDataset, MLMSettings, initial_states
            from data.sources import file_sizes, resolve_files

            files = resolve_files(self.cfg.data.eval_files)
            eval_settings = MLMSettings.from_config(self.cfg, audit=False, micro_batch_size=
                                                    self.cfg.eval.micro_batch_size or self.cfg.train.micro_batch_size)
            ds = MLMDataset(files, file_sizes(files), self.spec, eval_settings,
                            initial_states(self.info.rank, self.info.world_size, 1), finite=True)
            limit = self.cfg.eval.max_batches
            self.eval_batches = []
            for batch in ds:
                if limit is not None and len(self.eval_batches) >= limit:
                    break
                if batch["meta"]["n_blocks"]:
                    self.eval_batches.append(batch)
        return self.eval_batches

    def track_best(self, state, result) -> bool:
        better = state.best_metric is None or result["eval_loss"] < state.best_metric
        if better:
            state.best_metric, state.best_step = result["eval_loss"], state.step
        return better

    def finish(self, trainer) -> None:
        """output_dir/final: the last checkpoint exported to Hugging Face format by rank 0, alone (no
        collective follows: the other ranks are done and do not wait for it)."""
        if self.audit_file is not None:
            self.audit_file.close()
        ckpt = step_dir(trainer.saver.root, trainer.state.step)
        if self.info.is_main and ckpt.is_dir():
            from launch.tools.export import export

            export(ckpt, Path(self.cfg.output_dir) / "final")
            trainer.metrics.info(f"final model: {Path(self.cfg.output_dir) / 'final'}")

