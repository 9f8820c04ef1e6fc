"""The training loop's own logic, in milliseconds: a fake engine and a fake task drive the real Trainer
(non-finite losses, skipped updates, spikes, the stop flag, eval / checkpoint cadence, the watchdog)."""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from bertlaunch.core.dist import DistInfo
from bertlaunch.core.exits import EXIT_NONFINITE, EXIT_OK, EXIT_REQUEUE
from bertlaunch.core.layout import RunDir
from bertlaunch.core.loop import Trainer
from bertlaunch.core.metrics import MetricsLog
from bertlaunch.core.plan import Phase
from bertlaunch.core.task import Task, TrainState
from bertlaunch.core.watchdog import Heartbeat, collectives_block, main_thread_outside_collectives
from bertlaunch.tasks.mlm.config import PretrainConfig

NULL = {"null": True, "meta": {}}


class FakeEngine:
    """Records the learning rate the optimizer saw at every accumulation boundary."""

    def __init__(self, accum: int):
        self.accum, self.calls, self.updates = accum, 0, []
        self.optimizer = SimpleNamespace(param_groups=[{"lr": 0.1}])
        self.mode = "train"

    def backward(self, loss):
        pass

    def step(self):
        self.calls += 1
        if self.calls % self.accum == 0:
            self.updates.append(self.optimizer.param_groups[0]["lr"])

    def get_lr(self):
        return [self.optimizer.param_groups[0]["lr"]]

    def set_train_micro_batch_size(self, micro):
        self.micro = micro

    def set_train_batch_size(self, global_batch):
        self.global_batch = global_batch

    def get_global_grad_norm(self):
        return 1.0

    def eval(self):
        self.mode = "eval"

    def train(self):
        self.mode = "train"


class FakeTask:
    """Micro-batch losses from a list; evaluation results from a list; records what the loop asked."""

    def __init__(self, losses: list[float], total_steps: int, eval_every: int = 0, evals=(), keeps_best=False):
        self.losses, self.total_steps, self.eval_every = list(losses), total_steps, eval_every
        self.evals, self.keeps_best = list(evals), keeps_best
        self.consumed_steps, self.eval_at, self.null_calls, self.finished = [], [], 0, False
        self.on_step = None  # hook(step) when a step's first batch is consumed

    def batches(self):
        while True:
            yield {"meta": {}}

    def set_phase(self, phase):
        self.phases_seen = getattr(self, "phases_seen", []) + [(phase.index, len(self.consumed_steps))]

    def consumed(self, batch, step):
        if self.on_step and step not in self.consumed_steps:
            self.on_step(step)
        self.consumed_steps.append(step)

    def forward(self, engine, batch):
        self.modes = getattr(self, "modes", []) + [engine.mode]
        if batch is NULL:
            self.null_calls += 1
            return torch.tensor(0.0)
        return torch.tensor(self.losses.pop(0))

    def null_batch(self):
        return NULL

    def counts(self, batch):
        return {"real_tokens": 10, "slots": 10, "sequences": 1}

    def flops(self, counts):
        return 0.0

    def log_extra(self, totals):
        return {}

    def evaluate(self, engine):
        self.eval_at.append(engine.mode)
        return {"eval_loss": self.evals.pop(0)} if self.evals else {}

    def track_best(self, state, result):
        better = state.best_metric is None or result["eval_loss"] < state.best_metric
        if better:
            state.best_metric, state.best_step = result["eval_loss"], state.step
        return better

    def data_state(self):
        return {}

    def finish(self, end):
        self.finished = True


class FakeSaver:
    def __init__(self, root: Path):
        self.root, self.protected, self.saved = root, set(), []
        self.uploads = None  # no checkpoint.remote

    def save(self, engine, step, trainer_state):
        self.saved.append(step)
        return self.root / f"step_{step:08d}"

    def complete(self, steps):  # one shared output_dir: nothing to fetch
        pass


def make_trainer(tmp_path, task: FakeTask, accum: int = 1, phases=None, **cfg_changes) -> Trainer:
    cfg = PretrainConfig(output_dir=str(tmp_path))
    cfg.log.every, cfg.checkpoint.every = 1, 0
    for key, value in cfg_changes.items():
        section, name = key.split("__")
        setattr(getattr(cfg, section), name, value)
    info = DistInfo(0, 1, 0, 1, "127.0.0.1", 0, "single")
    assert isinstance(task, Task)
    phases = phases or (Phase(0, 0, task.total_steps, 64, 8, accum, 8 * accum),)
    plan = SimpleNamespace(phases=phases, schedule=None)
    return Trainer(train=cfg.train, log=cfg.log, checkpoint=cfg.checkpoint, run_dir=RunDir(tmp_path), info=info,
                   engine=FakeEngine(accum), task=task, state=TrainState(), plan=plan,
                   metrics=MetricsLog(str(tmp_path), True, task.total_steps, 0, progress=False),
                   saver=FakeSaver(tmp_path / "checkpoints"), trainer_extra={}, peak_flops=None)


def rows(tmp_path) -> list[dict]:
    return [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]


def test_a_nan_micro_batch_is_dropped_and_the_step_still_updates(tmp_path, capsys):
    nan = float("nan")
    task = FakeTask([1.0, 1.0, 2.0, nan, 1.0, 1.0], total_steps=3)
    t = make_trainer(tmp_path, task, accum=2)
    assert t.fit() == EXIT_OK
    assert task.null_calls == 1  # the bad micro-batch was replaced by a zero-loss one (same collectives)
    assert t.engine.updates == [0.1, 0.1, 0.1] and t.state.bad_micro_batches == 1 and t.state.skipped_steps == 0
    assert [r["loss"] for r in rows(tmp_path) if "loss" in r] == [1.0, 1.0, 1.0]  # (2.0 + 0) / 2 micro-batches
    assert "step 2: 1/2 micro-batch(es) had a non-finite loss and were dropped" in capsys.readouterr().out


def test_a_step_whose_every_micro_batch_is_bad_does_not_move_the_weights(tmp_path):
    nan = float("nan")
    task = FakeTask([1.0, 1.0, nan, nan, 1.0, 1.0], total_steps=3)
    t = make_trainer(tmp_path, task, accum=2)
    assert t.fit() == EXIT_OK
    assert t.engine.updates == [0.1, 0.0, 0.1]  # lr 0 for step 2's update only, then restored
    assert t.state.skipped_steps == 1 and rows(tmp_path)[1]["skipped_steps"] == 1


def test_nan_policy_stop_checkpoints_the_step_and_exits_3(tmp_path, capsys):
    task = FakeTask([1.0, float("nan"), 1.0], total_steps=3)
    t = make_trainer(tmp_path, task, train__nan_policy="stop")
    assert t.fit() == EXIT_NONFINITE
    assert t.saver.saved == [2] and not task.finished
    assert "stopping: non-finite loss at step 2" in capsys.readouterr().out


def test_too_many_bad_steps_in_a_row_stop_even_under_skip(tmp_path):
    nan = float("nan")
    task = FakeTask([1.0, nan, nan, nan, 1.0], total_steps=5)
    t = make_trainer(tmp_path, task, train__max_bad_steps=3)
    assert t.fit() == EXIT_NONFINITE and t.state.step == 4 and t.saver.saved == [4]


def test_log_step_checks_stop_without_saving_the_suspect_state(tmp_path, capsys):
    task = FakeTask([1.0, float("inf"), 1.0, 1.0], total_steps=4)
    t = make_trainer(tmp_path, task, train__nan_check="log_steps", log__every=2)
    assert t.fit() == EXIT_NONFINITE and t.saver.saved == []
    assert "non-finite loss in the steps before 2" in capsys.readouterr().out
    assert rows(tmp_path)[-1]["loss"] is None  # written as null, never as NaN


def test_a_loss_spike_is_flagged_and_warned(tmp_path, capsys):
    losses = [2.0, 2.02, 1.98, 2.01, 1.99, 2.0, 9.0, 2.0]
    t = make_trainer(tmp_path, FakeTask(losses, total_steps=8))
    assert t.fit() == EXIT_OK
    spikes = [r["step"] for r in rows(tmp_path) if r.get("loss_spike")]
    assert spikes == [7] and "WARNING: loss spike at step 7: 9" in capsys.readouterr().out


def test_the_stop_flag_checkpoints_at_the_step_boundary_and_exits_75(tmp_path):
    task = FakeTask([1.0] * 10, total_steps=10)
    t = make_trainer(tmp_path, task)
    task.on_step = lambda step: setattr(t.stop_flag, "signum", signal.SIGTERM) if step == 4 else None
    assert t.fit() == EXIT_REQUEUE
    assert t.state.step == 4 and t.saver.saved == [4] and not task.finished
    assert signal.getsignal(signal.SIGTERM) is not t.stop_flag._handler  # handlers restored after the run


def test_eval_and_checkpoint_cadence_and_the_best_checkpoint(tmp_path):
    task = FakeTask([1.0] * 10, total_steps=10, eval_every=3, evals=[5.0, 4.0, 4.5, 3.0], keeps_best=True)
    t = make_trainer(tmp_path, task, checkpoint__every=4)
    assert t.fit() == EXIT_OK
    assert [r["step"] for r in rows(tmp_path) if "eval_loss" in r] == [3, 6, 9, 10]  # every 3 steps + at the end
    assert task.eval_at == ["eval"] * 4 and t.engine.mode == "train"  # eval mode only while evaluating
    # improvements at 3 (first), 6 and 10 save (and protect) a checkpoint; every 4 steps; at the end
    assert t.saver.saved == [3, 4, 6, 8, 10, 10] and t.saver.protected == {10}
    assert t.state.best_step == 10 and task.finished
    assert [r["step"] for r in rows(tmp_path) if "loss" in r] == list(range(1, 11))


def test_every_step_trains_in_train_mode_also_before_the_first_evaluation(tmp_path):
    """from_pretrained returns a model in eval mode: the loop switches it to training before the first step
    (found by the GLUE resume test: a pretrained model trained without dropout until its first evaluation)."""
    task = FakeTask([1.0] * 6, total_steps=6, eval_every=3, evals=[2.0, 1.0])
    t = make_trainer(tmp_path, task)
    t.engine.mode = "eval"
    assert t.fit() == EXIT_OK
    assert task.modes == ["train"] * 6


def test_tokens_and_samples_are_counted_over_the_run(tmp_path):
    t = make_trainer(tmp_path, FakeTask([1.0] * 6, total_steps=3), accum=2, log__every=3)
    t.fit()
    last = rows(tmp_path)[-1]
    assert (last["tokens"], last["samples"], last["real_token_frac"]) == (60, 6, 1.0)
    assert math.isclose(last["lr"], 0.1)


def test_the_watchdog_stays_paused_through_the_final_save(tmp_path):
    """A save at the end beats the heartbeat; that must not re-arm the watchdog while rank 0 exports."""
    hb = Heartbeat(tmp_path / ".heartbeat", rank=0, world=1, timeout_s=5)
    hb.last -= 10
    assert hb.stalled_for() == pytest.approx(10, abs=1)
    hb.pause()
    hb.beat(7)  # the final checkpoint
    hb.last -= 10  # ... then a long single-rank export
    assert hb.stalled_for() is None
    assert hb.step == 7  # progress is still recorded (the poll thread writes it for the other ranks)
    hb.close()


def test_phases_switch_data_and_accumulation_at_the_boundary(tmp_path):
    """Phase 0 (steps 0-2, 1 micro-batch a step), then phase 1 (steps 3-4, 2 a step): the task is told at the
    start and at the boundary, before the boundary step's first batch; the engine follows the batch sizes."""
    task = FakeTask([1.0] * 7, total_steps=5)
    phases = (Phase(0, 0, 3, 64, 8, 1, 8), Phase(1, 3, 5, 128, 4, 2, 8))
    t = make_trainer(tmp_path, task, phases=phases)
    assert t.fit() == EXIT_OK
    assert task.phases_seen == [(0, 0), (1, 3)]  # phase 1 starts after 3 consumed micro-batches
    assert task.consumed_steps == [1, 2, 3, 4, 4, 5, 5]
    assert (t.engine.micro, t.engine.global_batch, t.accum) == (4, 8, 2)


def _where_main_thread_sleeps(code: str, filename: str) -> str | None:
    seen = []
    spy = threading.Thread(target=lambda: (time.sleep(0.2), seen.append(main_thread_outside_collectives())))
    spy.start()
    exec(compile(code, filename, "exec"), {})
    spy.join()
    return seen[0]


def test_the_watchdog_names_where_a_rank_is_stuck_outside_collectives():
    where = _where_main_thread_sleeps("import time\ndef stuck():\n    time.sleep(0.6)\nstuck()", "/x/user_step.py")
    assert where == "stuck (/x/user_step.py:3)"


def test_a_rank_waiting_in_torch_distributed_is_not_the_hung_one():
    filename = os.path.join("/x", "torch", "distributed", "distributed_c10d.py")
    assert _where_main_thread_sleeps("import time\ntime.sleep(0.6)", filename) is None


def test_only_blocking_collectives_let_a_rank_outside_them_name_itself(monkeypatch):
    """gloo calls block until every rank joins; NCCL ones return at once (the wait shows at a later CUDA sync)."""
    assert not collectives_block()  # no process group in this test
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    for backend, blocks in (("gloo", True), ("nccl", False)):
        monkeypatch.setattr(torch.distributed, "get_backend", lambda group=None, b=backend: b)
        assert collectives_block() is blocks
