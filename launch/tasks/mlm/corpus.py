"""The pretraining corpus of a run: its files (or token cache, or mixture sources) resolved, sized and checked
against the number of streams, before any model or engine exists."""

from __future__ import annotations

from dataclasses import dataclass

from bertlaunch.core import configlib
from bertlaunch.data.corpus.compressed import compression_of
from bertlaunch.data.corpus.reader import file_sizes, resolve_files, text_readers
from bertlaunch.data.corpus.shards import DataError
from bertlaunch.data.mlm.cache import cache_readers, check_tokenizer, read_meta, shard_names_and_sizes
from bertlaunch.data.mlm.mixture import Source
from bertlaunch.data.mlm.stream import empty_streams


@dataclass
class Corpus:
    """What the streams read: files (token-cache shards play that role) with their sizes, and the sources of a
    weighted mixture (None for one corpus)."""

    files: list[str]
    sizes: list[int]
    sources: list[Source] | None

    @property
    def mixture(self) -> list | None:
        """[[name, weight], ...] of a mixture, as trainer.json records it."""
        return [[src.name, src.weight] for src in self.sources] if self.sources else None


def resolve_corpus(d, spec) -> Corpus:
    """data.cache, data.sources or data.train_files, resolved (globs, URLs) and sized."""
    if d.cache:  # a token cache from `bertlaunch prepare`: shards play the role of files
        check_tokenizer(read_meta(d.cache), spec, d.cache)
        return Corpus(*shard_names_and_sizes(d.cache), None)
    if d.sources:
        sources = mixture_sources(d)
        return Corpus([f for src in sources for f in src.files], [n for src in sources for n in src.sizes], sources)
    files = resolve_files(d.train_files)
    return Corpus(files, file_sizes(files), None)


def mixture_sources(d) -> list[Source]:
    """data.sources resolved: files, sizes and each source's settings (data/mlm/mixture.py)."""
    out, base = [], 0
    for src in d.sources:
        files = resolve_files(src.files)
        out.append(Source(src.name, files, file_sizes(files), src.weight, src.txt_documents or d.txt_documents,
                          src.text_field or d.text_field, base))
        base += len(files)
    return out


def starved_why(files: list[str]) -> str:
    """Why some streams get no document, and the ways out (for the error and the dry run)."""
    packed = sum(1 for f in files if compression_of(f))
    if packed:
        return (f"compressed files are read whole, one stream each, and {packed} of the {len(files)} file(s) "
                "are compressed; lower data.num_workers, use fewer ranks, add files, or build a token cache, "
                "which splits compressed files evenly: bertlaunch prepare")
    return "the corpus is too small to split that many ways; lower data.num_workers, use fewer ranks or add data"


def check_streams(d, corpus: Corpus, n: int) -> None:
    """Every one of the n streams owns at least one document (of every source of a mixture), else a
    DataError that says why and the ways out."""
    if d.cache:
        parts = [("data.cache", corpus.files, corpus.sizes, cache_readers(d.cache))]
    elif corpus.sources:
        parts = [(f"data.sources '{src.name}'", src.files, src.sizes,
                  text_readers(src.files, src.mode, src.text_field, d.max_chunk_bytes, d.encoding_errors))
                 for src in corpus.sources]
    else:
        parts = [("data.train_files", corpus.files, corpus.sizes,
                  text_readers(corpus.files, d.txt_documents, d.text_field, d.max_chunk_bytes, d.encoding_errors))]
    for key, part_files, part_sizes, readers in parts:
        if sum(part_sizes) == 0:
            raise DataError(f"{key}: every file is empty ({', '.join(part_files)})")
        empty = empty_streams(readers, part_sizes, n)
        if empty:
            raise DataError(f"{key}: {len(empty)} of {n} data streams (world_size x data.num_workers) would "
                            f"get no document: {starved_why(part_files)} (streams {empty[:8]})")


def check_same_data(corpus: Corpus, saved: dict, resume_from) -> None:
    """The checkpoint's stream positions are offsets into these files: refuse a resume over other ones."""
    changed = []
    if saved["files"] != corpus.files or saved["sizes"] != corpus.sizes:
        changed.append("the files or their sizes differ")
    if saved.get("mixture") != corpus.mixture:
        changed.append(f"the sources or weights differ ({saved.get('mixture')} then, {corpus.mixture} now)")
    if changed:
        key = "data.sources" if corpus.sources or saved.get("mixture") else "data.train_files"
        raise configlib.ConfigError([f"{key} changed since {resume_from}: {'; '.join(changed)}, so the saved "
                                     "positions are meaningless; restore them or start a new output_dir"])
