"""Build a token cache once, in parallel: `bertlaunch prepare --config RUN.yaml --out DIR [--workers N]`.

Reads data.train_files (and tokenizer, data.txt_documents, data.text_field, ...) from a pretraining config
(or --files / --tokenizer; or one source of a mixture, --source NAME), tokenizes with one process per core
(data/mlm/cache_build.py), and writes the shards that training reads with data.cache=DIR. Any input training reads
works: .txt/.jsonl plain or compressed, .parquet, local or fsspec URLs (data.storage_options applies).
"""

from __future__ import annotations

import argparse
import sys

from bertlaunch.core import configlib
from bertlaunch.data.mlm.cache_build import prepare
from bertlaunch.tasks.mlm.config import PretrainConfig, use_storage


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bertlaunch prepare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="a pretraining YAML: its data.* and tokenizer are used")
    p.add_argument("--files", nargs="*", help="paths/globs (instead of the config's data.train_files)")
    p.add_argument("--tokenizer", help="tokenizer (default: the config's, else bert-base-uncased)")
    p.add_argument("--out", required=True, help="cache folder to write")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    p.add_argument("--source", help="with a data.sources (mixture) config: the source to build the cache of")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the config")
    args = p.parse_args(argv)

    d, tokenizer = None, args.tokenizer or "bert-base-uncased"
    if args.config:
        try:
            cfg = configlib.load(PretrainConfig, args.config, args.overrides)
        except configlib.ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        d, tokenizer = cfg.data, args.tokenizer or cfg.tokenizer
        use_storage(d)
    kw = {"mode": d.txt_documents, "text_field": d.text_field, "max_chunk_bytes": d.max_chunk_bytes,
          "errors": d.encoding_errors} if d else {}
    files = args.files or (d.train_files if d else None)
    if d and d.sources and not args.files:
        names = [src.name for src in d.sources]
        if args.source not in names:
            print(f"error: the config is a mixture of {', '.join(names)}: pick one with --source NAME "
                  "(a cache holds one source)", file=sys.stderr)
            return 2
        src = d.sources[names.index(args.source)]
        files = src.files
        kw.update(mode=src.txt_documents or d.txt_documents, text_field=src.text_field or d.text_field)
    if not files:
        print("error: give --files or a --config with data.train_files", file=sys.stderr)
        return 2
    meta = prepare(files, tokenizer, args.out, workers=args.workers, **kw)
    rate = meta["n_tokens"] / max(meta["build_seconds"], 1e-9)
    print(f"token cache {args.out}: {meta['n_tokens']} tokens, {meta['n_docs']} documents, "
          f"{len(meta['shards'])} shard(s) in {meta['build_seconds']:.1f}s ({rate / 1e6:.2f}M tokens/s); "
          f"train with data.cache={args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
