"""The training loop (shared by every task) and what happens between steps.

A task (launch/core/task.py: the `Task` protocol) supplies the data, the forward pass, evaluation and
the end-of-run outputs; the loop owns accumulation, the non-finite-loss policy, logging, evaluation and
checkpoint cadence, and stopping on signals.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import time
from dataclasses import asdict

import torch

from bertlaunch.core import dist, hooks
from bertlaunch.core.config import CheckpointConfig, LogConfig, TrainConfig
from bertlaunch.core.exits import EXIT_NONFINITE, EXIT_OK, EXIT_REQUEUE
from bertlaunch.core.export import ExportError, export
from bertlaunch.core.jobs import Downstream
from bertlaunch.core.layout import RunDir
from bertlaunch.core.metrics import SpikeDetector
from bertlaunch.core.plan import Plan, phase_at
from bertlaunch.core.profiler import Profiler
from bertlaunch.core.signals import StopFlag
from bertlaunch.core.task import Ending, Task, TrainState
from bertlaunch.core.watchdog import Heartbeat


class Trainer:
    """Drives `task` for plan.total_steps. It reads only its own config sections: train (nan policy, time
    budget, timeouts), log (cadence, profiling) and checkpoint (cadence, exports)."""

    def __init__(self, *, train: TrainConfig, log: LogConfig, checkpoint: CheckpointConfig, run_dir: RunDir, info,
                 engine, task: Task, state: TrainState, plan: Plan, metrics, saver, trainer_extra,
                 peak_flops: float | None, downstream: Downstream | None = None):
        self.train, self.log, self.ckpt, self.run_dir = train, log, checkpoint, run_dir
        self.info, self.engine, self.task = info, engine, task
        self.state, self.phases, self.metrics, self.saver = state, plan.phases, metrics, saver
        self.uploads = saver.uploads  # checkpoint.remote: the background uploads (launch/core/upload.py), or None
        self.phase, self.accum = None, plan.phases[0].accum
        self.stop_flag, self.trainer_extra, self.peak = StopFlag(), trainer_extra, peak_flops
        self.downstream = downstream  # rank 0 of a run with eval.downstream: scores every export beside the training
        self.bad_in_row = 0
        # a host sync per micro-batch: on GPUs only when asked for (train.nan_check)
        self.check_each = train.nan_check == "micro_batch" or (
            train.nan_check == "auto" and not torch.cuda.is_available())
        self.heartbeat = Heartbeat(run_dir.heartbeats, info.rank, info.world_size, train.dist_timeout_s)
        self.hooks = hooks.installed  # tests only (launch/core/hooks.py)
        self.loss_of = task.forward if self.hooks is None else self._hooked_loss
        self.spikes = SpikeDetector()
        self.profiler = Profiler(run_dir.root, info.is_main) if log.profile else None
        self.p_tokens = self.p_samples = 0  # this rank's counts not yet in state.tokens/samples
        self.budget_s = (train.time_budget_h or 0) * 3600
        self.schedule, self.out_of_time = plan.schedule, False  # train.time_budget_h: a TimedSchedule
        # checkpoint.export_at: fractions of the steps, or of the time budget; those already passed are done
        self.exports_due = sorted(f for f in checkpoint.export_at if f > self._progress())
        self.control = None  # the stop-flag / elapsed-time all-reduce started at the previous step
        self._reset_meter()
        self.t_start = time.time()

    def fit(self) -> int:
        """Train to task.total_steps; returns the process exit code."""
        try:
            return self._fit()
        finally:
            if self.control is not None:  # every rank started it at the same step: it completes
                self.control.wait()
            if self.uploads is not None:
                self.uploads.close()
            self.heartbeat.close()
            self.stop_flag.restore()
            if self.downstream is not None:  # stopped early (or failed): children stop, unrecorded, for a resume
                self.downstream.close()

    def _fit(self) -> int:
        task, engine = self.task, self.engine
        # from_pretrained hands back a model in eval mode: without this a pretrained model trains without dropout
        # until its first evaluation, and a resumed run (a fresh engine) would differ from a straight one
        engine.train()
        batches = task.batches()
        while self.state.step < task.total_steps and not self.out_of_time:
            self._enter_phase()  # a new sequence length / batch size from this step on (train.phases)
            bad = 0
            for i in range(self.accum):  # gradient accumulation over `accum` micro-batches
                batch = next(batches)  # input_ids/labels/attention_mask: int64[B, L]
                task.consumed(batch, self.state.step + 1)  # the data position this batch leaves
                loss = self.loss_of(engine, batch)  # mean loss of the micro-batch
                if self.check_each and not self._all_finite(loss):  # NaN/inf on any rank: all drop it
                    bad += 1
                    loss = task.forward(engine, task.null_batch())  # zero loss, same collectives
                engine.backward(loss)
                with self._skip_update(bad == self.accum and i == self.accum - 1):
                    engine.step()  # DeepSpeed runs the optimizer on the accumulation boundary
                self._meter(batch, loss)
            self.state.step += 1
            self.heartbeat.beat(self.state.step)  # progress, for the hung/dead-rank watchdog
            if self.profiler is not None:
                self.profiler.step(self.state.step)
            with torch.profiler.record_function("bertlaunch:between_steps"):  # host time, seen in profiles
                code = self._after_step(bad)  # log, eval, checkpoint, signals, non-finite policy
            if code is not None:
                return code
        return self._finish()

    # -- between steps ---------------------------------------------------------------------------
    def _after_step(self, bad: int) -> int | None:
        """Log, evaluate, checkpoint; returns an exit code when the run must stop here."""
        step, train = self.state.step, self.train
        signum, elapsed = self._agree()
        if self.budget_s:
            self._follow_time(elapsed / self.budget_s)
        self.state.bad_micro_batches += bad
        self.state.skipped_steps += bad == self.accum
        self.bad_in_row = self.bad_in_row + 1 if bad else 0
        if bad:
            self.metrics.info(f"WARNING: step {step}: {bad}/{self.accum} micro-batch(es) had a non-finite "
                              f"loss and were dropped (train.nan_policy={train.nan_policy})")
            if train.nan_policy == "stop" or self.bad_in_row >= train.max_bad_steps:
                return self._stop(EXIT_NONFINITE, f"stopping: non-finite loss at step {step}; the last good "
                                  f"state is in {self.saver.root}; lower train.lr, use bf16/fp32, or inspect "
                                  "the data")
        record = None
        if step % self.log.every == 0 or step == self.task.total_steps or self.out_of_time:
            record = self._log_record(elapsed)
            if self.spikes.is_spike(record["loss"]):
                record["loss_spike"] = 1
                self.metrics.info(f"WARNING: loss spike at step {step}: {record['loss']:.4g} (recent mean "
                                  f"{self.spikes.mean:.4g}); watch for divergence (lower train.lr / more warmup)")
            self.metrics.write(record)
            if not self.check_each and not math.isfinite(record["loss"]):  # nan_check=log_steps
                return self._stop(EXIT_NONFINITE, f"stopping: non-finite loss in the steps before {step}; "
                                  f"resume from the last checkpoint in {self.saver.root} (lower train.lr, or use "
                                  "train.nan_check=micro_batch to drop bad batches instead)", save=False)
        self.metrics.step(step, record)
        if self.task.eval_every and step % self.task.eval_every == 0 and step < self.task.total_steps:
            self.evaluate()
        if self.ckpt.every and step % self.ckpt.every == 0:
            self.save()
        if self.exports_due and self._progress(elapsed) >= self.exports_due[0] and not self._at_end():
            self.exports_due = [f for f in self.exports_due if f > self._progress(elapsed)]
            self.export(self.save())
        if self.downstream is not None and (record is not None or (self.ckpt.every and step % self.ckpt.every == 0)):
            self.downstream.poll()  # never waits: finished jobs' scores go into metrics.jsonl
        if signum:
            return self._stop(EXIT_REQUEUE, f"signal received: checkpoint saved at step {step}; exiting with "
                              f"code {EXIT_REQUEUE} (rerun the same command to resume)")
        return None

    def _stop(self, code: int, message: str, save: bool = True) -> int:
        """The one way out before the last step: checkpoint (unless the state is suspect), finish its upload, say
        why, close."""
        if save:
            self.save()
        self._drain()
        self.metrics.info(message)
        self.metrics.close()
        return code

    def _drain(self) -> None:
        """checkpoint.remote: wait (collectively, bounded by checkpoint.upload_timeout_s) for the newest checkpoint's
        upload; waiting on the network is not a hung rank."""
        if self.uploads is not None:
            self.heartbeat.pause()
            self.uploads.drain()

    def _finish(self) -> int:
        # from here on rank 0 works alone at times (the final export): not a hang. Saving below beats the
        # heartbeat but does not re-arm the watchdog; tasks put single-rank work after their last collective.
        self.heartbeat.pause()
        self.evaluate()
        if self.ckpt.at_end or self.exports_due:
            ckpt = self.save()  # the final checkpoint is also the source of output_dir/final
            if self.exports_due:  # export_at 1.0 (or a fraction the last step jumped past)
                self.export(ckpt)
        self._drain()
        self.saver.complete({self.state.step} | self.saver.protected)  # node-local output_dirs: from the remote
        self.task.finish(Ending(self.engine, self.state, self.saver.root, self.metrics.info))
        if self.downstream is not None:  # rank 0 alone, after the last collective
            self.downstream.finish(lambda: bool(self.stop_flag.signum))
        self.metrics.close()
        if self.uploads is not None and self.info.is_main:  # after the last collective: rank 0 alone
            self.uploads.outputs()
        return EXIT_OK

    def evaluate(self) -> dict:
        self.engine.eval()
        with torch.no_grad():
            result = self.task.evaluate(self.engine)
        self.engine.train()
        if result:
            improved = self.task.track_best(self.state, result)
            self.metrics.write({"step": self.state.step, **result})
            self.metrics.info(f"eval @ step {self.state.step}: "
                              + " ".join(f"{k}={v:.4g}" for k, v in result.items() if isinstance(v, float)))
            if improved and self.task.keeps_best:
                self.saver.protected = {self.state.step}  # the best checkpoint outlives keep_last
                self.save()
        return result

    def export(self, ckpt) -> None:
        """checkpoint.export_at: rank 0 writes the checkpoint as a Hugging Face folder under output_dir/exports/
        (downstream evaluation can start while training goes on); a failed export warns and training goes on."""
        if not self.info.is_main or ckpt is None:
            return
        dest = self.run_dir.exports / ckpt.name
        tmp = dest.with_name(dest.name + ".part")
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            export(ckpt, tmp, verify_manifest=False)
            shutil.rmtree(dest, ignore_errors=True)
            os.replace(tmp, dest)
            self.metrics.info(f"exported step {self.state.step} ({self.state.step / self.task.total_steps:.0%} of "
                              f"the run): {dest}")
            if self.uploads is not None:
                self.uploads.export(dest)
        except (OSError, ExportError, RuntimeError, ValueError) as e:
            self.metrics.info(f"WARNING: export of {ckpt} failed ({e}); training continues")
            return
        if self.downstream is not None:
            self.downstream.launch(dest, self.state.step, self.state.tokens)

    def save(self):
        self.heartbeat.beat(self.state.step)
        self._flush_totals()
        trainer = {"state": asdict(self.state), **self.trainer_extra, **self.task.data_state()}
        trainer["state"]["elapsed_s"] = self._elapsed()
        return self.saver.save(self.engine, self.state.step, trainer)

    # -- helpers ---------------------------------------------------------------------------------
    def _hooked_loss(self, engine, batch):
        return self.hooks.loss(self.state.step + 1, self.info.rank, self.task.forward(engine, batch))

    def _at_end(self) -> bool:
        return self.state.step >= self.task.total_steps or self.out_of_time

    def _progress(self, elapsed: float | None = None) -> float:
        """The fraction of the run done: of the time budget, or of the steps."""
        if self.budget_s:
            return (self.state.elapsed_s if elapsed is None else elapsed) / self.budget_s
        return self.state.step / max(self.task.total_steps, 1)

    def _elapsed(self) -> float:
        """Training wall time of this run so far, earlier attempts included (seconds)."""
        return self.state.elapsed_s + time.time() - self.t_start

    def _follow_time(self, fraction: float) -> None:
        """Time budget: the lr of the next step follows the fraction of the budget used; past the budget the
        run ends after this step, with the lr at its floor."""
        self.schedule.fraction = fraction
        self.out_of_time = fraction >= 1.0
        sched = self.engine.lr_scheduler
        for group, base in zip(sched.optimizer.param_groups, sched.base_lrs):
            group["lr"] = base * self.schedule(sched.last_epoch)

    def _enter_phase(self) -> None:
        """At the first step of a phase (and at the start of a run): the task switches its data to the
        phase's block size and micro-batch from its current position; DeepSpeed's batch arithmetic follows."""
        ph = phase_at(self.phases, self.state.step)
        if ph is self.phase:
            return
        self.phase, self.accum = ph, ph.accum
        self.task.set_phase(ph)
        self.engine.set_train_micro_batch_size(ph.micro)
        self.engine.set_train_batch_size(ph.global_batch)
        if hasattr(self.engine.optimizer, "gradient_accumulation_steps"):  # ZeRO 1/2 keep their own copy
            self.engine.optimizer.gradient_accumulation_steps = ph.accum
        if len(self.phases) > 1:
            self.metrics.info(f"phase {ph.index}: steps {ph.start}-{ph.end}, block size {ph.block_size}, global "
                              f"batch {ph.global_batch} (micro {ph.micro} x accumulation {ph.accum})")


    def _agree(self) -> list[float]:
        """The stop signal and the elapsed time, the same on all ranks, without a wait between steps: each
        step starts a host all-reduce of its own values (gloo, its own group) and acts on the one the step
        before started, which completed while this step computed. A signal is thus acted on one step after
        it arrives, by every rank at the same step. (One rank: no collective, no delay.) The background uploads
        agree the same way (launch/core/upload.py)."""
        report = self.uploads.report() if self.uploads is not None else []  # checkpoint.remote: uploads done, failed
        started = dist.all_reduce_async([float(self.stop_flag.signum), self._elapsed()] + report, "max")
        if started.in_flight:  # else one rank: nothing to agree on
            previous, self.control = self.control, started
            started = previous or started
        values = started.wait()
        if self.uploads is not None:
            self.uploads.agreed(values[2:])
        return values[:2]

    def _all_finite(self, loss: torch.Tensor) -> bool:
        bad = 0.0 if torch.isfinite(loss.detach()).item() else 1.0  # the one host sync per micro-batch
        return dist.all_reduce([bad], "max", host=True)[0] == 0.0

    @contextlib.contextmanager
    def _skip_update(self, skip: bool):
        """lr 0 for one optimizer step: parameters stay as they are when every micro-batch was bad."""
        groups = self.engine.optimizer.param_groups if skip else []
        saved = [g["lr"] for g in groups]
        for g in groups:
            g["lr"] = 0.0
        try:
            yield
        finally:
            for g, lr in zip(groups, saved):
                g["lr"] = lr

    def _flush_totals(self):
        """Add the not-yet-counted tokens/samples of all ranks to the run totals (one collective)."""
        tokens, samples = dist.all_reduce([float(self.p_tokens), float(self.p_samples)], "sum")
        self.state.tokens += int(tokens)
        self.state.samples += int(samples)
        self.p_tokens = self.p_samples = 0

    def _reset_meter(self):
        self.m_loss = 0.0
        self.m_micro = 0
        self.m_counts: dict[str, float] = {}
        self.m_t0 = time.time()

    def _meter(self, batch, loss):
        self.m_loss += loss.detach().float()  # stays on the device: no sync per micro-batch
        self.m_micro += 1
        counts = self.task.counts(batch)
        for k, v in counts.items():
            self.m_counts[k] = self.m_counts.get(k, 0) + v
        self.p_tokens += counts.get("real_tokens", 0)
        self.p_samples += counts.get("sequences", 0)

    def _log_record(self, elapsed: float) -> dict:
        keys = sorted(self.m_counts)
        local = [float(self.m_loss), float(self.m_micro)] + [float(self.m_counts[k]) for k in keys]
        tot = dist.all_reduce(local, "sum")
        counts = dict(zip(keys, tot[2:]))
        dt = max(time.time() - self.m_t0, 1e-9)
        self._flush_totals()
        flops = self.task.flops(counts)
        grad_norm = self.engine.get_global_grad_norm()
        record = {"step": self.state.step, "loss": tot[0] / max(tot[1], 1),
                  "lr": self.engine.get_lr()[0], "tokens": self.state.tokens,
                  "samples": self.state.samples, "tokens_per_s": counts.get("real_tokens", 0) / dt,
                  "samples_per_s": counts.get("sequences", 0) / dt,
                  "grad_norm": float(grad_norm) if grad_norm is not None else None,
                  "real_token_frac": counts.get("real_tokens", 0) / max(counts.get("slots", 1), 1),
                  "skipped_steps": self.state.skipped_steps + int(getattr(self.engine, "skipped_steps", 0)),
                  "time": round(elapsed, 3)}
        if self.peak and flops:
            record["mfu"] = flops / dt / (self.peak * self.info.world_size)
        if torch.cuda.is_available():
            record["mem_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        record.update(self.task.log_extra({"tokens": self.state.tokens, "step": self.state.step}))
        self._reset_meter()
        return {k: v for k, v in record.items() if not (isinstance(v, float) and math.isnan(v))} | {
            "loss": record["loss"]}
