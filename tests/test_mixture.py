"""Weighted mixtures (data.sources): shares at any world size, each source's documents exactly once per
its own epoch, exact resume and re-split, metrics and per-source eval, bad sources named."""

from collections import Counter

import pytest

from bertlaunch.data.corpus.reader import file_sizes
from bertlaunch.data.mlm.mixture import MixtureState, MixtureStream, Source, cumulative_bounds, pick, replan_mixture
from tests.helpers import full_only, make_corpus, read_metrics
from tests.test_formats import compressed_copy, parquet_corpus


def make_sources(tmp_path, weights=(3.0, 1.0)):
    """'web': a bigger plain + gzip corpus; 'wiki': a small Parquet one that runs out first (jsonl-style)."""
    web = [make_corpus(tmp_path / "web1.txt", 300, seed=1),
           compressed_copy(make_corpus(tmp_path / "web2.txt", 200, seed=2), ".gz")]
    _, wiki = parquet_corpus(tmp_path, n=10, row_group=3)
    files = {"web": [str(f) for f in web], "wiki": [str(wiki)]}
    return [Source("web", files["web"], file_sizes(files["web"]), weights[0], "blank_line", "text", 0),
            Source("wiki", files["wiki"], file_sizes(files["wiki"]), weights[1], "line", "text", 2)]


def run_stream(sources, state, spec, stop):
    """(source index, tokens, audit, state after) per block, until stop(state) is true."""
    stream = MixtureStream(sources, spec, block_size=32, last_block="pad", state=MixtureState.from_dict(state),
                           seed=7, max_chunk_bytes=1 << 20, errors="strict", audit=True)
    out = []
    base = {s.base: i for i, s in enumerate(sources)}
    for blk in stream:
        src = max(b for b in base if b <= blk.where[1])
        out.append((base[src], blk.tokens.tolist(), blk.audit, stream.state.to_dict()))
        if stop(stream.state):
            return out
    return out


@pytest.mark.parametrize("weights", [(2, 1, 1), (0.7, 0.2, 0.1), (1, 1)])
def test_shares_hold_over_10k_blocks_at_any_world_size(weights):
    sources = [Source(str(i), [], [], w, "line", "text", 0) for i, w in enumerate(weights)]
    bounds, want = cumulative_bounds(sources), [w / sum(weights) for w in weights]
    for n_streams in (1, 2, 3, 8, 64):
        counts = Counter()
        for j in range(n_streams):  # stream j's i-th block has k = j + n_streams * i
            counts.update(pick(11, j + n_streams * i, bounds) for i in range(10_000 // n_streams))
        total = sum(counts.values())
        for i, w in enumerate(want):
            assert abs(counts[i] / total - w) < 0.002, (n_streams, i, counts[i] / total, w)
    # a resize: 3 streams after 5000 blocks on 2 keep the shares over the whole run
    states = [MixtureState(j, 2, {}, 2500, {}, j, 2) for j in range(2)]
    after = replan_mixture(states, [], 3, {})
    counts = Counter(pick(11, j + 2 * i, bounds) for j in range(2) for i in range(2500))
    counts.update(pick(11, st.first + st.stride * i, bounds) for st in after for i in range(1667))
    assert all(abs(counts[i] / sum(counts.values()) - w) < 0.002 for i, w in enumerate(want))


def test_each_source_once_per_its_epoch_resume_and_resplit(tmp_path, spec):
    """2 streams read until the big source's first epoch is over (the small one goes round several times on
    its own); each stops somewhere, a stopped stream resumes exactly, and the rest re-split over 3 streams
    still reads every document of every epoch once."""
    sources = make_sources(tmp_path)
    one = run_stream(sources, MixtureState.fresh(0, 1, sources).to_dict(), spec,
                     lambda st: st.sources["web"].epoch >= 1)
    truth = [Counter(), Counter()]
    for i, _, audit, _ in one:
        for epoch, doc, k in audit:
            if epoch == 0:
                truth[i][doc] += k
    assert len(truth[0]) == 500 and len(truth[1]) == 9  # every document (one parquet row is empty)
    wiki_epochs = one[-1][3]["sources"]["wiki"]["epoch"]
    assert wiki_epochs >= 2  # the small source started over on its own
    shares = Counter(i for i, *_ in one)
    assert abs(shares[0] / len(one) - 0.75) < 0.02

    seen, states = {}, []
    for s, n in ((0, 25), (1, 40)):  # 2 streams, stopped after different numbers of blocks
        got = run_stream(sources, MixtureState.fresh(s, 2, sources).to_dict(), spec,
                         lambda st, n=n: st.blocks >= n)
        if s == 1:  # resume from a mid-run state: the same blocks as reading straight on
            more = run_stream(sources, MixtureState.fresh(s, 2, sources).to_dict(), spec,
                              lambda st: st.blocks >= 60)
            again = run_stream(sources, got[-1][3], spec, lambda st: st.blocks >= 60)
            assert [b[:3] for b in again] == [b[:3] for b in more[len(got):]]
        for i, _, audit, _ in got:
            for epoch, doc, k in audit:
                seen[(i, epoch, doc)] = seen.get((i, epoch, doc), 0) + k
        states.append(MixtureState.from_dict(got[-1][3]))
    for new in replan_mixture(states, sources, 3, {"web": frozenset({1})}):
        for i, _, audit, _ in run_stream(sources, new.to_dict(), spec, lambda st: st.sources["web"].epoch >= 1):
            for epoch, doc, k in audit:
                seen[(i, epoch, doc)] = seen.get((i, epoch, doc), 0) + k
    for i in range(2):
        assert {d: k for (j, e, d), k in seen.items() if j == i and e == 0} == truth[i]
    # the small source's later epochs: never a document twice within one
    assert all(k <= truth[i][d] for (i, e, d), k in seen.items())


def test_mixture_run_logs_tokens_by_source_and_evaluates_each(tmp_path, tiny_config, inproc):
    sources = make_sources(tmp_path)
    held_out = make_corpus(tmp_path / "held.txt", 12, seed=9)
    cfg = tiny_config("pretrain", {
        "data.sources": [{"name": "web", "files": sources[0].files, "weight": 3, "eval_files": [str(held_out)]},
                         {"name": "wiki", "files": sources[1].files, "weight": 1, "txt_documents": "line"}],
        "data.block_size": 32, "train.max_steps": 8, "eval.every": 8})
    inproc("pretrain", cfg)
    rows = read_metrics(tmp_path / "out")
    train = [r for r in rows if "tokens_by_source" in r]
    last = train[-1]
    assert set(last["tokens_by_source"]) == {"web", "wiki"} and set(last["epoch_by_source"]) == {"web", "wiki"}
    assert sum(last["tokens_by_source"].values()) == last["tokens"]  # real tokens: every trained one, by source
    assert 0.6 < last["tokens_by_source"]["web"] / last["tokens"] < 0.9
    evals = [r for r in rows if "eval_loss/web" in r]
    assert evals and evals[-1]["eval_loss"] == evals[-1]["eval_loss/web"]  # the only eval set


def test_dry_run_shows_each_source(tmp_path, tiny_config, inproc):
    sources = make_sources(tmp_path)
    cfg = tiny_config("pretrain", {
        "data.sources": [{"name": "web", "files": sources[0].files, "weight": 3},
                         {"name": "wiki", "files": sources[1].files}], "train.max_steps": 100})
    out = inproc("pretrain", cfg, ["--dry-run"]).stdout
    assert "a mixture of 2 sources, 1 stream(s) each" in out
    web = next(x for x in out.splitlines() if x.strip().startswith("web "))
    wiki = next(x for x in out.splitlines() if x.strip().startswith("wiki "))
    assert "txt, txt.gz, 2 file(s)" in web and "(1 compressed: each read whole by one stream)" in web
    assert "weight 3 -> 75.0% of blocks" in web
    assert "parquet, 1 file(s), 10 rows" in wiki and "weight 1 -> 25.0% of blocks" in wiki
    # epochs in this run = share x token slots (100 steps x 8 x 64) / the source's estimated tokens
    est = float(wiki.split("~")[1].split("M tokens")[0]) * 1e6  # 3 significant digits
    epochs = float(wiki.split("blocks, ~")[1].split(" epoch")[0])
    assert abs(epochs - 0.25 * 100 * 8 * 64 / est) < 0.05 * epochs


def test_bad_sources_are_all_named(tmp_path, tiny_config, inproc):
    c = make_corpus(tmp_path / "c.txt", 10)
    cfg = tiny_config("pretrain", {"data.train_files": [str(c)], "data.sources": [
        {"name": "a", "files": [], "weight": 0}, {"name": "a", "files": [str(tmp_path / "missing*.txt")]}]})
    err = inproc("pretrain", cfg, check=False).stderr
    for want in ("data.sources replaces data.train_files", "data.sources[0] (a): no files",
                 "data.sources[0] (a): weight must be > 0, got 0.0",
                 "data.sources[1] (a): the name 'a' is used by more than one source",
                 "data.sources[1] (a).files: '" + str(tmp_path / "missing*.txt") + "' matches no file"):
        assert want in err, err


@pytest.mark.slow
@full_only("a mixture resumed and re-split: test_each_source_once_per_its_epoch_resume_and_resplit; "
           "killed 2-rank runs: test_resume.py")
def test_two_ranks_kill_resume_and_resize_on_a_gz_and_parquet_mixture(tmp_path, tiny_config):
    """2 CPU ranks on a mixture of a .txt + .txt.gz source and a .parquet source. SIGKILLed at step 9 and
    resumed on 2 ranks: losses and weights bit-identical to the run never killed. The same checkpoint
    resumed on 3 ranks instead: every document of each source's finished epochs trained exactly once,
    token for token, and the shares hold."""
    import json
    import shutil

    from bertlaunch.core.checkpoint import list_checkpoints
    from bertlaunch.data.tokenize import load_spec
    from tests.helpers import assert_resumed, audited_tokens, compare, doc_tokens, run, run_and_kill

    web = [str(make_corpus(tmp_path / "a.txt", 30, seed=3)),
           str(compressed_copy(make_corpus(tmp_path / "b.txt", 12, seed=4), ".gz"))]
    _, wiki = parquet_corpus(tmp_path, n=14, row_group=4)
    cfg = tiny_config("pretrain", {
        "data.sources": [{"name": "web", "files": web}, {"name": "wiki", "files": [str(wiki)]}],
        "data.num_workers": 1, "data.block_size": 32, "data.audit": True, "train.micro_batch_size": 2,
        "train.global_batch_size": 12, "train.max_steps": 24, "checkpoint.every": 4, "train.warmup_steps": 0})
    straight, killed, resized = tmp_path / "straight", tmp_path / "killed", tmp_path / "resized"
    run("pretrain", 2, cfg, [f"output_dir={straight}"])
    step = run_and_kill("pretrain", 2, cfg, [f"output_dir={killed}"], killed, 9, 24)
    shutil.copytree(killed, resized)
    assert_resumed(run("pretrain", 2, cfg, [f"output_dir={killed}"]).stdout, killed, step)
    assert compare(straight, killed) == []

    proc = run("pretrain", 3, cfg, [f"output_dir={resized}"])
    assert_resumed(proc.stdout, resized, step)
    assert "resized from 2 rank(s)" in proc.stdout
    trainer = json.loads((list_checkpoints(resized / "checkpoints")[-1][1] / "trainer.json").read_text())
    truth, seen = doc_tokens(web + [str(wiki)], load_spec("bert-base-uncased")), audited_tokens(resized)
    for name, files in (("web", range(0, 2)), ("wiki", range(2, 3))):
        done = min(st["sources"][name]["epoch"] for st in trainer["streams"])
        assert done >= 1, name
        mine = {d: n for d, n in truth.items() if d >> 40 in files}
        for epoch in range(done):
            assert {d: n for (e, d), n in seen.items() if e == epoch and d >> 40 in files} == mine, (name, epoch)
        assert all(n <= truth[d] for (_, d), n in seen.items())
    last = [r for r in read_metrics(resized) if "tokens_by_source" in r][-1]
    assert abs(last["tokens_by_source"]["web"] / last["tokens"] - 0.5) < 0.1
