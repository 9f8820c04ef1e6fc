"""`bertlaunch retrieval MODEL DATA_DIR [--split test] [--out FILE]` (also `python -m bertlaunch.tools.retrieval`):
nDCG@10, Recall@100 and MRR@10 of a sentence-embedding model on a BEIR folder (corpus.jsonl, queries.jsonl,
qrels/<split>.tsv), by exact search over the whole encoded corpus.

MODEL is a sentence-transformers folder (its pooling, normalisation and max_seq_length are used), a plain Hugging
Face encoder folder such as a pretraining export (mean pooling, normalised, unless --pooling / --no-normalize say
otherwise), our run's output_dir (its final/), or `minilm`. Under torchrun / srun / deepspeed every rank encodes and
searches its share of the corpus. Prints a table; --out writes the scores as JSON: {"ndcg@10", "recall@100",
"mrr@10", ...}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from bertlaunch.core import dist
from bertlaunch.core.config import ModelConfig
from bertlaunch.core.exits import EXIT_CONFIG, EXIT_OK
from bertlaunch.data.corpus.embedded import resolve_model_alias
from bertlaunch.data.tables.beir import load_beir
from bertlaunch.data.tokenize import load_hf_tokenizer
from bertlaunch.model.embed import POOLINGS, Encoder, SentenceSettings, load_encoder, read_sentence_transformers
from bertlaunch.tasks.embed.retrieval import score, table, tokenize_set
from bertlaunch.tasks.embed.spec import encoder_dir

DEFAULT_MAX_LENGTH = 512


def parse(argv):
    p = argparse.ArgumentParser(prog="bertlaunch retrieval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="sentence-transformers folder, Hugging Face folder, run output_dir, or minilm")
    p.add_argument("data_dir", help="BEIR folder: corpus.jsonl, queries.jsonl, qrels/<split>.tsv")
    p.add_argument("--split", default="test", help="qrels split (default: test)")
    p.add_argument("--out", help="write the scores as JSON here")
    p.add_argument("--pooling", choices=POOLINGS, help="pooling of a plain Hugging Face folder (default: mean; a "
                   "sentence-transformers folder's own otherwise)")
    p.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None,
                   help="L2-normalise the embeddings (cosine; default for a plain folder), or not (dot product)")
    p.add_argument("--max-length", type=int, help=f"truncate texts to N tokens (default: the model's max_seq_length, "
                   f"else {DEFAULT_MAX_LENGTH} or the model's positions)")
    p.add_argument("--batch-size", type=int, default=128, help="texts per forward pass (default: 128)")
    return p.parse_args(argv)


def settings_of(model: str, args) -> SentenceSettings:
    """The folder's own settings (a sentence-transformers folder), with the command line's on top."""
    root = Path(resolve_model_alias(model))
    found = (read_sentence_transformers(root) if root.is_dir() else None) or SentenceSettings(
        model_dir=encoder_dir(model))
    return SentenceSettings(args.pooling or found.pooling,
                            found.normalize if args.normalize is None else args.normalize,
                            args.max_length or found.max_length, found.model_dir)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    info = dist.init() if dist.detect().world_size > 1 else dist.detect()
    try:
        return run(args, info)
    except (OSError, ValueError) as e:
        print(f"[rank {info.rank}] error: {e}", file=sys.stderr, flush=True)
        return EXIT_CONFIG
    finally:
        dist.destroy()


def run(args, info) -> int:
    t0 = time.time()
    s = settings_of(args.model, args)
    tok = load_hf_tokenizer(s.model_dir)
    hf_model, config = load_encoder(ModelConfig(pretrained=s.model_dir), s.model_dir, len(tok), tok.pad_token_id)
    max_length = s.max_length or min(DEFAULT_MAX_LENGTH, getattr(config, "max_position_embeddings", None)
                                     or DEFAULT_MAX_LENGTH)
    beir = load_beir(args.data_dir, args.split)
    device = dist.device()
    encoder = Encoder(hf_model, s.pooling, s.normalize).to(device).eval()
    with torch.no_grad():
        result = score(encoder, tokenize_set(beir, tok, max_length), args.batch_size, device)
    if info.is_main:
        print(table(result, beir, f"retrieval {args.model}"), flush=True)
        if args.out:
            record = result | {"model": args.model, "data_dir": args.data_dir, "split": args.split,
                               "queries": len(beir.query_ids), "documents": len(beir.corpus_ids),
                               "pooling": s.pooling, "normalize": s.normalize, "max_length": max_length,
                               "world_size": info.world_size, "seconds": round(time.time() - t0, 2)}
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(record, indent=1))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
