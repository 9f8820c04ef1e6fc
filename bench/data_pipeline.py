"""Data path throughput on the CPU: ours (stream -> tokenize -> pack -> mask -> batches) vs the HF `run_mlm.py`
path (datasets `map` tokenize -> `group_texts` -> DataCollatorForLanguageModeling) vs the raw fast tokenizer,
and our token cache (`data.prepare` build rate; cache -> packed, masked batches).

    python bench/data_pipeline.py                      # WikiText-2 valid+test from ../shared/data, x4
    python bench/data_pipeline.py --files a.txt b.txt --repeat 1

Every path reads the same text (the files concatenated `--repeat` times into a temporary folder), with the
same tokenizer (bert-base-uncased WordPiece) and block size, and is timed end to end to batches in memory
(process start-up of loader workers and dataset preparation included, Python start-up excluded). Writes
bench/results/data_pipeline_<machine>.json.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.env import bench_parser, machine_info, repeat_corpus, write_result  # noqa: E402


def raw_tokenizer(lines: list[str], hf_tok) -> dict:
    """The ceiling: the Rust tokenizer alone (all cores) on every text, special tokens added."""
    backend = hf_tok.backend_tokenizer
    t0 = time.perf_counter()
    n = 0
    for i in range(0, len(lines), 1000):
        n += sum(len(e.ids) for e in backend.encode_batch(lines[i:i + 1000], add_special_tokens=True))
    dt = time.perf_counter() - t0
    return {"seconds": dt, "tokens": n, "tokens_per_s": n / dt}


def hf_path(path: Path, hf_tok, block: int, batch: int, tmp: Path) -> dict:
    """run_mlm.py without line_by_line: tokenize every line, concatenate each map batch of 1000 lines,
    cut block-size chunks (the rest of every map batch is dropped), collate with 15% masking."""
    import datasets
    from torch.utils.data import DataLoader
    from transformers import DataCollatorForLanguageModeling

    datasets.disable_progress_bars()
    t0 = time.perf_counter()
    raw = datasets.load_dataset("text", data_files={"train": str(path)}, cache_dir=str(tmp / "hf_cache"))["train"]
    tokenized = raw.map(lambda ex: hf_tok(ex["text"], return_special_tokens_mask=True), batched=True,
                        remove_columns=["text"], load_from_cache_file=False)
    n_tokens = sum(len(x) for x in tokenized["input_ids"])

    def group_texts(examples):
        concatenated = {k: sum(examples[k], []) for k in examples}
        total = (len(concatenated["input_ids"]) // block) * block
        return {k: [t[i:i + block] for i in range(0, total, block)] for k, t in concatenated.items()}

    grouped = tokenized.map(group_texts, batched=True, load_from_cache_file=False)
    collator = DataCollatorForLanguageModeling(hf_tok, mlm_probability=0.15)
    loader = DataLoader(grouped, batch_size=batch, collate_fn=collator)
    n_blocks = n_real = 0
    for b in loader:
        n_blocks += b["input_ids"].shape[0]
        n_real += int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel()
    dt = time.perf_counter() - t0
    return {"seconds": dt, "tokens_tokenized": n_tokens, "tokens_in_blocks": n_real, "tokens_per_s": n_tokens / dt,
            "blocks": n_blocks, "real_token_frac": n_real / (n_blocks * block),
            "kept_frac": n_real / n_tokens}


def our_batches(spec, block: int, batch: int, workers: int, files=None, sizes=None, cache=None) -> dict:
    from bertlaunch.data.mlm.batches import MLMDataset, MLMSettings, initial_states, make_loader

    s = MLMSettings(block_size=block, micro_batch_size=batch, mlm_probability=0.15, whole_word_masking=False,
                    seed=0, last_block="pad", mode="line")
    ds = MLMDataset(files, sizes, spec, s, initial_states(0, 1, max(workers, 1)), finite=True, cache=cache)
    # as in training (launch/core/dist.py): one tokenizer thread per loader worker; the other paths keep theirs
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false" if workers else "true"
    t0 = time.perf_counter()
    n_real = n_slots = n_blocks = 0
    for b in make_loader(ds, workers):
        m = b["meta"]
        n_real, n_slots, n_blocks = n_real + m["n_real"], n_slots + m["n_slots"], n_blocks + m["n_blocks"]
    dt = time.perf_counter() - t0
    if before is None:
        del os.environ["TOKENIZERS_PARALLELISM"]
    else:
        os.environ["TOKENIZERS_PARALLELISM"] = before
    return {"seconds": dt, "tokens_in_blocks": n_real, "tokens_per_s": n_real / dt, "blocks": n_blocks,
            "real_token_frac": n_real / n_slots, "workers": workers}


def main() -> None:
    ap = bench_parser(__doc__)
    ap.add_argument("--repeat", type=int, default=4)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=32, help="blocks per batch (HF's default per-device batch is 8)")
    ap.add_argument("--cache-batch", type=int, default=256)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()

    from bertlaunch.data.corpus.reader import file_sizes
    from bertlaunch.data.mlm.cache import shard_names_and_sizes
    from bertlaunch.data.mlm.cache_build import prepare
    from bertlaunch.data.tokenize import load_hf_tokenizer, load_spec

    spec, hf_tok = load_spec("bert-base-uncased"), load_hf_tokenizer("bert-base-uncased")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        path = repeat_corpus(args.files, args.repeat, tmp)
        files = [str(path)]
        res = {"machine": machine_info(), "command": " ".join(sys.argv), "files": args.files, "repeat": args.repeat,
               "corpus_bytes": path.stat().st_size, "block_size": args.block_size, "batch": args.batch}
        # ours first, the HF path next (its forked tokenizer threads must not slow our workers), raw last
        res["ours_streaming"] = our_batches(spec, args.block_size, args.batch, args.workers, files, file_sizes(files))
        res["hf_run_mlm"] = hf_path(path, hf_tok, args.block_size, args.batch, tmp)
        res["raw_tokenizer"] = raw_tokenizer(path.read_text(encoding="utf-8").splitlines(), hf_tok)
        t0 = time.perf_counter()
        meta = prepare(files, "bert-base-uncased", str(tmp / "cache"), workers=args.workers, mode="line")
        build = time.perf_counter() - t0
        res["cache_build"] = {"seconds": build, "tokens": meta["n_tokens"], "tokens_per_s": meta["n_tokens"] / build,
                              "workers": args.workers}
        _, sizes = shard_names_and_sizes(str(tmp / "cache"))
        for w in (0, args.workers):
            res[f"cache_batches_w{w}"] = our_batches(spec, args.block_size, args.cache_batch, w, sizes=sizes,
                                                     cache=str(tmp / "cache"))
            res[f"cache_batches_w{w}"]["batch"] = args.cache_batch
    ours, hf, raw = res["ours_streaming"], res["hf_run_mlm"], res["raw_tokenizer"]
    best_cache = max(res[f"cache_batches_w{w}"]["tokens_per_s"] for w in (0, args.workers))
    res["summary"] = {
        "ours_vs_hf_speedup": hf["seconds"] / ours["seconds"], "target_ours_vs_hf": 3.5,
        "ours_vs_raw_tokenizer": ours["tokens_per_s"] / raw["tokens_per_s"], "target_ours_vs_raw": 0.8,
        "ours_real_token_frac": ours["real_token_frac"], "target_real_token_frac": 0.995,
        "hf_kept_frac": hf["kept_frac"],
        "cache_tokens_per_s": best_cache, "target_cache_tokens_per_s": 20e6,
        "cache_build_vs_raw_tokenizer": res["cache_build"]["tokens_per_s"] / raw["tokens_per_s"]}
    write_result(res, "data_pipeline", args.out)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    main()
