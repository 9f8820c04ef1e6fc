"""Test helpers: launching real runs (one process, N ranks, or the deepspeed launcher), killing them
mid-run, and reading their outputs. Shared fixtures built on these live in tests/conftest.py."""

from __future__ import annotations

import atexit
import functools
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

from bertlaunch.core.checkpoint import list_checkpoints, verify
from bertlaunch.core.dist import free_port
from bertlaunch.core.layout import RunDir
from bertlaunch.tools.check_resume import compare, last_step, losses  # noqa: F401  (re-exported for the tests)
from tests.zygote import GRACE_S

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "data"
WIKI_VALID = SHARED / "wikitext2" / "valid.txt"
WIKI_TEST = SHARED / "wikitext2" / "test.txt"
MRPC = SHARED / "mrpc"

SHARED_MISSING = "" if (WIKI_VALID.is_file() and (MRPC / "train.tsv").is_file()) else f"{SHARED} is not present"


def needs_shared(test):
    """The test reads ../shared/data: skipped without it, except where it is required (BERTLAUNCH_REQUIRE_SHARED=1,
    set by .ci/run): there a missing folder fails the test, as a missing SLURM does."""
    @functools.wraps(test)
    def check(*args, **kwargs):
        if SHARED_MISSING:
            if os.environ.get("BERTLAUNCH_REQUIRE_SHARED") == "1":
                pytest.fail(f"../shared/data required here: {SHARED_MISSING}")
            pytest.skip(SHARED_MISSING)
        return test(*args, **kwargs)
    return check


def env(**extra) -> dict:
    """The environment of a run the tests start: offline, CPU ranks, one thread, and tests/hookpath on PYTHONPATH
    (its sitecustomize installs the fault hooks of tests/faults.py when a BERTLAUNCH_* variable asks for one)."""
    e = dict(os.environ)
    e.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", DS_ACCELERATOR="cpu", WANDB_MODE="offline",
             PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
             PYTHONPATH=os.pathsep.join(filter(None, [str(REPO / "tests" / "hookpath"), os.environ.get("PYTHONPATH")])))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(key, None)
    e.update({k: str(v) for k, v in extra.items()})
    return e


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


class Zygote:
    """The warm fork server of tests/zygote.py, started on first use and stopped when the tests end."""

    proc: subprocess.Popen | None = None

    @classmethod
    def start_job(cls, entry: str, argv: list[str], envs: list[dict], logs: Path) -> int:
        if cls.proc is None or cls.proc.poll() is not None:
            cls.proc = subprocess.Popen([sys.executable, "-m", "tests.zygote"], cwd=REPO, env=env(),
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            atexit.register(cls.proc.kill)
            assert cls.proc.stdout.readline().strip() == "ready", "tests/zygote.py did not start"
        cls.proc.stdin.write(json.dumps({"entry": entry, "argv": argv, "envs": envs, "logs": str(logs)}) + "\n")
        cls.proc.stdin.flush()
        return json.loads(cls.proc.stdout.readline())["pid"]


class Job:
    """One run of launch/<entry>.py; ranks=0: a single process (no RANK), ranks=N: N ranks with the
    variables torchrun sets. Every process of the job shares one process group, so a SIGKILL of the group
    is a kill of the whole job (dataloader workers included), as a scheduler does; when one rank fails,
    the others are killed a few seconds later (GRACE_S), as launchers do. launcher:
      fork       forked from tests/zygote.py, imports already done (~8 s less per run)
      exec       a fresh `python launch/<entry>.py` per rank (the entry script itself)
      deepspeed  the real `deepspeed` launcher"""

    def __init__(self, entry: str, ranks: int, config, overrides, launcher: str = "fork", **env_extra):
        script = str(REPO / "launch" / f"{entry}.py")
        args = (["--config", str(config)] if config else []) + [str(o) for o in overrides]
        self.logs = Path(tempfile.mkdtemp(prefix="job-"))
        port = free_port()
        envs = [env(**env_extra)] if ranks == 0 else [
            env(RANK=r, LOCAL_RANK=r, WORLD_SIZE=ranks, LOCAL_WORLD_SIZE=ranks, MASTER_ADDR="127.0.0.1",
                MASTER_PORT=port, **env_extra) for r in range(ranks)]
        self.n, self.leader, self.procs, self.fail_deadline = len(envs), None, [], None
        if launcher == "fork":
            self.leader = Zygote.start_job(entry, args, envs, self.logs)
        elif launcher == "deepspeed":
            cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks), "--master_port",
                   str(port), script] + args
            self.n, self.procs = 1, [self._start(cmd, env(**env_extra), 0, None)]
        else:
            for i, e in enumerate(envs):
                self.procs.append(self._start([sys.executable, script] + args, e, i,
                                              self.procs[0].pid if self.procs else None))

    def _start(self, cmd, environ, i, group):
        out, err = open(self.logs / f"{i}.out", "w"), open(self.logs / f"{i}.err", "w")
        return subprocess.Popen(cmd, cwd=REPO, env=environ, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                text=True, process_group=0 if group is None else group)

    @property
    def pgid(self) -> int:
        return self.leader if self.leader is not None else self.procs[0].pid

    def poll(self) -> int | None:
        """None while running; else the job's exit code (the first failing rank's; 137 when killed)."""
        if self.leader is not None:
            if (self.logs / "exit").is_file():
                return int((self.logs / "exit").read_text())
            try:
                os.kill(self.leader, 0)
                return None
            except ProcessLookupError:
                return 128 + signal.SIGKILL
        codes = [p.poll() for p in self.procs]
        if None in codes and any(c not in (None, 0) for c in codes):
            # as the zygote's leader does: the others get GRACE_S to finish (exit 75 too, or report), then die
            self.fail_deadline = self.fail_deadline or time.time() + GRACE_S
            if time.time() > self.fail_deadline:
                self.kill()
                codes = [p.wait() for p in self.procs]
        if None in codes:
            return None
        return next((c for c in codes if c != 0), 0)

    def wait(self, timeout: float) -> int:
        deadline = time.time() + timeout
        while (code := self.poll()) is None:
            if time.time() > deadline:
                self.kill()
                raise AssertionError(f"timed out after {timeout}s:\n{self.output()[-6000:]}")
            time.sleep(0.05)
        return code

    def wait_until(self, condition, timeout: float, what: str) -> None:
        """Poll until condition() holds; the job ending first, or the timeout (the job is then killed), fails."""
        deadline = time.time() + timeout
        while not condition():
            code = self.poll()
            if code is not None:
                raise AssertionError(f"the run ended (exit {code}) before {what}:\n{self.output()[-6000:]}")
            if time.time() > deadline:
                self.kill()
                raise AssertionError(f"timed out after {timeout}s waiting for {what}:\n{self.output()[-6000:]}")
            time.sleep(0.05)

    def kill(self, sig=signal.SIGKILL) -> None:
        try:
            os.killpg(self.pgid, sig)
        except ProcessLookupError:
            return
        if sig == signal.SIGKILL:
            for p in self.procs:
                p.wait()
            while self.leader is not None and self.poll() is None:
                time.sleep(0.01)

    def output(self) -> str:
        return self.stdout + self.stderr

    def _read(self, suffix: str) -> str:
        return "".join((self.logs / f"{i}.{suffix}").read_text() for i in range(self.n)
                       if (self.logs / f"{i}.{suffix}").is_file())

    @property
    def stdout(self) -> str:
        return self._read("out")

    @property
    def stderr(self) -> str:
        return self._read("err")


def run(entry: str, ranks: int, config, overrides, timeout: int = 900, check: bool = True,
        launcher: str = "fork", **env_extra) -> Result:
    job = Job(entry, ranks, config, overrides, launcher, **env_extra)
    code = job.wait(timeout)
    if check and code != 0:
        raise AssertionError(f"exit {code}\n--- stdout\n{job.stdout[-6000:]}\n--- stderr\n{job.stderr[-6000:]}")
    return Result(code, job.stdout, job.stderr)


def committed_step(out_dir: Path) -> int:
    """The step of the newest checkpoint that verifies (0: none): where a resume must start."""
    return next((step for step, path in reversed(list_checkpoints(RunDir(out_dir).checkpoints))
                 if verify(path) is None), 0)


def run_and_kill(entry: str, ranks: int, config, overrides, out_dir: Path, kill_after_step: int, end_step: int,
                 timeout: int = 900, launcher: str = "fork", hold: bool = False, resumes_from: int | None = None,
                 **env_extra) -> int:
    """SIGKILL the whole job once metrics.jsonl reaches the step. Checks that the job was still running when
    killed and never finished (no final/, the last logged step below `end_step`); returns the step of the newest
    committed checkpoint, where the next attempt must resume. hold=True: rank 0 is held in the next step (the
    fault hook) and the kill waits for the checkpoint of `kill_after_step`, so the resume point is exactly it.
    resumes_from: this attempt is itself a resume, and its log must say from which step."""
    if hold:
        env_extra.update(BERTLAUNCH_HANG_RANK=0, BERTLAUNCH_HANG_AT_STEP=kill_after_step + 1)
    job = Job(entry, ranks, config, overrides, launcher, **env_extra)
    run_dir = RunDir(out_dir)
    job.wait_until(lambda: last_step(run_dir.metrics) >= kill_after_step and (
        not hold or committed_step(out_dir) >= kill_after_step), timeout, f"step {kill_after_step}")
    assert job.poll() is None, f"the job ended before it was killed:\n{job.output()[-3000:]}"
    job.kill()
    assert not run_dir.final.exists(), "the killed job finished (final/ exists)"
    assert kill_after_step <= last_step(run_dir.metrics) < end_step
    if resumes_from is not None:
        assert_resumed(job.output(), out_dir, resumes_from)
    return committed_step(out_dir)


def saved_on_signal(output: str) -> int:
    """The step a run stopped by SIGTERM/SIGUSR1 checkpointed, from its own log."""
    return int(re.search(r"signal received: checkpoint saved at step (\d+)", output).group(1))


def assert_resumed(output: str, out_dir: Path, step: int) -> None:
    """The run's own log says it resumed from the checkpoint of `step` (a restart from 0 is not a resume)."""
    line = f"resumed from {RunDir(out_dir).checkpoints / f'step_{step:08d}'} at step {step}"
    assert step > 0 and line in output, f"expected '{line}' in the run's output:\n{output[-3000:]}"


def read_metrics(out_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (Path(out_dir) / "metrics.jsonl").read_text().splitlines() if x.strip()]


def doc_tokens(files, spec):
    """Corpus truth: tokens (with [CLS]/[SEP]) of every document, keyed like the audit's doc ids."""
    from bertlaunch.data.corpus.reader import file_sizes, text_readers
    from bertlaunch.data.corpus.shards import Segment

    out = {}
    for fi, (reader, size) in enumerate(zip(text_readers(files, "blank_line", "text", 1 << 20, "strict"),
                                            file_sizes(files))):
        for p in reader.pieces(Segment(fi, 0, size)):
            key = fi * (1 << 40) + p.doc_offset
            out[key] = out.get(key, 0) + len(spec.encode([p.text])[0]) + p.doc_start + p.doc_end
    return out


def audited_tokens(out):
    """(epoch, doc) -> tokens trained; a step counts as trained by the last attempt that ran it (all its
    ranks), earlier attempts of that step were killed before their checkpoint."""
    by_step = {}
    for f in sorted((out / "audit").glob("rank_*.jsonl")):
        for line in f.read_text().splitlines():
            r = json.loads(line)
            by_step.setdefault(r["step"], {}).setdefault(r["attempt"], []).append(r)
    seen = Counter()
    for attempts in by_step.values():
        for r in attempts[max(attempts)]:
            for epoch, doc, n in r["docs"]:
                seen[(epoch, doc)] += n
    return seen


def write_yaml(path: Path, data: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(data))
    return path


def make_corpus(path: Path, n_docs: int, words_per_doc=(5, 60), seed: int = 0, mode: str = "blank_line") -> Path:
    """Documents with unique ids so that coverage can be audited."""
    rng = random.Random(seed)
    vocab = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda river stone house "
             "light music paper garden window cloud").split()
    docs = []
    for i in range(n_docs):
        n = rng.randint(*words_per_doc)
        docs.append(f"doc{i} " + " ".join(rng.choice(vocab) for _ in range(n)))
    sep = "\n\n" if mode == "blank_line" else "\n"
    path.write_text(sep.join(docs) + "\n")
    return path


def write_pairs(path: Path, n=60, labels=("yes", "no"), seed=0, sep="\t", header=("a", "b", "label")) -> Path:
    """A sentence-pair table; `labels` cycles, or is a function (i, rng) -> label."""
    rng = random.Random(seed)
    words = "river stone house light music paper garden window cloud".split()
    lines = [sep.join(header)]
    for i in range(n):
        a = " ".join(rng.choice(words) for _ in range(rng.randint(2, 30)))
        b = " ".join(rng.choice(words) for _ in range(rng.randint(2, 30)))
        lab = labels[i % len(labels)] if not callable(labels) else labels(i, rng)
        lines.append(sep.join([a, b, str(lab)]))
    path.write_text("\n".join(lines) + "\n")
    return path


def wandb_history(run_dir: Path) -> list[tuple[str, int, dict]]:
    from bertlaunch.core.tracking import read_history

    return read_history(run_dir)


# The official glue_data/ layouts, column for column (headers, header-less files, byte-order mark, MNLI's
# extra columns): (train/dev header or None, test header, label values, columns that hold text).
GLUE_LAYOUT = {
    "CoLA": (None, ["index", "sentence"], ("0", "1")),
    "SST-2": (["sentence", "label"], ["index", "sentence"], ("0", "1")),
    "MRPC": (["\ufeffQuality", "#1 ID", "#2 ID", "#1 String", "#2 String"],
             ["index", "#1 ID", "#2 ID", "#1 String", "#2 String"], ("0", "1")),
    "STS-B": (["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2",
               "score"], ["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1",
                          "sentence2"], None),
    "QQP": (["id", "qid1", "qid2", "question1", "question2", "is_duplicate"], ["id", "question1", "question2"],
            ("0", "1")),
    "MNLI": (["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
              "sentence1_parse", "sentence2_parse", "sentence1", "sentence2", "label1", "gold_label"],
             ["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
              "sentence1_parse", "sentence2_parse", "sentence1", "sentence2"],
             ("entailment", "neutral", "contradiction")),
    "QNLI": (["index", "question", "sentence", "label"], ["index", "question", "sentence"],
             ("entailment", "not_entailment")),
    "RTE": (["index", "sentence1", "sentence2", "label"], ["index", "sentence1", "sentence2"],
            ("entailment", "not_entailment")),
    "WNLI": (["index", "sentence1", "sentence2", "label"], ["index", "sentence1", "sentence2"], ("0", "1")),
}
GLUE_TEXT = {"sentence", "#1 String", "#2 String", "sentence1", "sentence2", "question1", "question2", "question"}


def write_glue(root: Path, tasks=tuple(GLUE_LAYOUT), n_train=48, n_dev=16, n_test=12, seed=0) -> Path:
    """A small glue_data/ folder in the release's exact layout; labels follow a word in the text, so a model
    can learn them. MNLI gets dev/test matched and mismatched (dev with label1..label5), plus diagnostic/."""
    rng = random.Random(seed)
    words = "river stone house light music paper garden window cloud".split()

    def row(header, labels, i, test=False):
        lab = labels[i % len(labels)] if labels else f"{(i * 7) % 50 / 10:.3f}"
        cue = words[i % len(labels) if labels else int(float(lab))]
        cells = []
        for col in header:
            name = col.lstrip("\ufeff")
            if name in GLUE_TEXT:
                cells.append(cue + " " + " ".join(rng.choice(words) for _ in range(rng.randint(2, 12))) + ' "q')
            elif name in ("label", "gold_label", "Quality", "score", "is_duplicate", "label1") and not test:
                cells.append(lab)
            else:
                cells.append(str(i))
        return "\t".join(cells)

    def table(path, header, labels, n, test=False, write_header=True):
        lines = (["\t".join(header)] if write_header else []) + [row(header, labels, i, test) for i in range(n)]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    for name in tasks:
        head, test_head, labels = GLUE_LAYOUT[name]
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        data_head = head or ["source", "label", "original_mark", "sentence"]
        dev_head = data_head[:-1] + ["label2", "label3", "label4", "label5", data_head[-1]] if name == "MNLI" \
            else data_head
        table(d / "train.tsv", data_head, labels, n_train, write_header=head is not None)
        for dev, test in ((("dev_matched.tsv", "test_matched.tsv"), ("dev_mismatched.tsv", "test_mismatched.tsv"))
                          if name == "MNLI" else (("dev.tsv", "test.tsv"),)):
            table(d / dev, dev_head, labels, n_dev, write_header=head is not None)
            table(d / test, test_head, labels, n_test, test=True)
        if name == "MNLI":
            (root / "diagnostic").mkdir(exist_ok=True)
            table(root / "diagnostic" / "diagnostic.tsv", ["index", "sentence1", "sentence2"], labels, 10, test=True)
    return root


def full_only(why: str):
    """Marks a test that CI (12 minutes on 2 cores) leaves out: `why` names what covers its behaviour there.
    BERTLAUNCH_FULL=1 runs it (before a release, or when touching what it guards)."""
    import pytest

    return pytest.mark.skipif(os.environ.get("BERTLAUNCH_FULL") != "1",
                              reason=f"CI time: BERTLAUNCH_FULL=1 runs it ({why})")
