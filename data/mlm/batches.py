"""Packed, masked MLM batches for one rank: an IterableDataset over its streams + a DataLoader.

Rank r with W dataloader workers owns streams r*W .. r*W+W-1 of N = world_size * W. Worker w serves
stream (w + rotation) % W: PyTorch's loader takes batches from workers round-robin starting at worker 0,
so after resuming at batch k the rotation k % W makes the stream order continue exactly as before.
"""

from __future__ import annotations

import atexit
import ctypes
import functools
import os
import signal
import sys
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from bertlaunch.data.corpus.reader import text_readers
from bertlaunch.data.mlm.cache import cache_readers
from bertlaunch.data.mlm.mask import block_keys, mask_tokens_rows
from bertlaunch.data.mlm.mixture import MixtureState, MixtureStream, Source
from bertlaunch.data.mlm.stream import Block, StreamState, TextStream


@dataclass
class MLMSettings:
    block_size: int
    micro_batch_size: int
    mlm_probability: float
    whole_word_masking: bool
    seed: int
    last_block: str = "pad"
    mode: str = "blank_line"
    text_field: str = "text"
    max_chunk_bytes: int = 1 << 20
    encoding_errors: str = "strict"
    audit: bool = False
    isolate_documents: bool = False

    @classmethod
    def from_config(cls, cfg, **override) -> MLMSettings:
        """From a pretraining config (its `data` and `train` sections); `override` replaces fields (the
        dry run's small batch, the eval set's batch size)."""
        d = cfg.data
        fields = dict(block_size=d.block_size, micro_batch_size=cfg.train.micro_batch_size,
                      mlm_probability=d.mlm_probability, whole_word_masking=d.whole_word_masking,
                      seed=cfg.train.seed, last_block=d.last_block, mode=d.txt_documents, text_field=d.text_field,
                      max_chunk_bytes=d.max_chunk_bytes, encoding_errors=d.encoding_errors, audit=d.audit,
                      isolate_documents=d.isolate_documents)
        return cls(**{**fields, **override})


def collate_blocks(blocks: list[Block], spec, s: MLMSettings, state: dict | None = None) -> dict:
    """Blocks -> {input_ids, labels, attention_mask: int64[B, L]} + bookkeeping.

    Short blocks (end of an epoch) are right-padded with [PAD]; pads are special, never masked."""
    trained = [blk for blk in blocks if blk.count]
    b, length = sum(blk.count for blk in trained), s.block_size
    ids = np.full((max(b, 1), length), spec.pad_id, dtype=np.int64)
    attn = np.zeros((max(b, 1), length), dtype=np.int64)
    i = 0
    for blk in trained:
        if blk.tokens.ndim == 2:  # a run of full blocks
            ids[i: i + blk.count] = blk.tokens
            attn[i: i + blk.count] = 1
        else:
            ids[i, : len(blk.tokens)] = blk.tokens
            attn[i, : len(blk.tokens)] = 1
        i += blk.count
    where = [np.asarray(blk.where, dtype=np.int64).reshape(-1, 4) for blk in trained]
    keys = block_keys(s.seed, np.concatenate(where) if where else np.zeros((1, 4), dtype=np.int64))
    inputs, labels, rows = mask_tokens_rows(ids, keys, special=spec.special_table, prob=s.mlm_probability,
                                 mask_id=spec.mask_id, vocab_size=spec.vocab_size,
                                 continuation=spec.is_continuation if s.whole_word_masking else None)
    n_real = int(attn.sum())
    # the masked positions for the sparse MLM head, found here on the CPU (no device sync), padded to a
    # multiple of 128 rows (target -100 = ignored) so the GPU sees few distinct shapes
    m = len(rows)
    pad = -m % 128
    mlm_rows = np.concatenate([rows, np.zeros(pad, dtype=rows.dtype)])
    mlm_targets = np.concatenate([labels.reshape(-1)[rows], np.full(pad, -100, dtype=labels.dtype)])
    out = {"input_ids": torch.from_numpy(inputs), "labels": torch.from_numpy(labels),
           "attention_mask": torch.from_numpy(attn), "mlm_rows": torch.from_numpy(mlm_rows.astype(np.int64)),
           "mlm_targets": torch.from_numpy(mlm_targets.astype(np.int64)),
           "meta": {"state": state, "n_real": n_real, "n_slots": b * length, "n_masked": m,
                    "n_blocks": b, "dropped": sum(blk.dropped for blk in blocks),
                    "audit": [a for blk in blocks for a in (blk.audit or [])] if s.audit else None}}
    if s.isolate_documents:
        out["doc_starts"] = torch.from_numpy(document_starts(trained, ids.shape[0], length))
        out["meta"]["max_doc_len"] = int(np.diff(out["doc_starts"].numpy(), append=ids.size).max())
    if b == 0:  # only a dropped tail: nothing to train on, the loop skips it but keeps its state
        out["labels"][:] = -100
        out["mlm_targets"][:] = -100
    return out


def document_starts(blocks: list[Block], rows: int, length: int) -> np.ndarray:
    """int64[D]: the flat indices (into rows x length) where a document starts, ascending (data.isolate_documents):
    where the packer saw one begin, every row's first token (a document continued from the block before restarts
    there) and the first pad of a short row (pads are a sequence of their own, so no real token attends to them)."""
    out, i = [np.arange(rows, dtype=np.int64) * length], 0
    for blk in blocks:
        out.append(blk.starts.astype(np.int64) + i * length)  # a run's offsets are flat over its rows already
        if blk.tokens.ndim == 1 and len(blk.tokens) < length:
            out.append(np.array([i * length + len(blk.tokens)], dtype=np.int64))
        i += blk.count
    return np.unique(np.concatenate(out))


class MLMDataset(IterableDataset):
    def __init__(self, files, sizes, spec, settings: MLMSettings, states: list[dict], rotation: int = 0,
                 finite: bool = False, cache: str | None = None, sources: list[Source] | None = None):
        """files/sizes: the text corpus (bytes), or with `cache`: the token cache's shards (tokens), or with
        `sources`: a weighted mixture (data/mlm/mixture.py; files/sizes unused, states are MixtureStates)."""
        super().__init__()
        self.files, self.sizes, self.spec, self.s, self.cache = files, sizes, spec, settings, cache
        self.sources = sources
        self.states, self.rotation, self.finite = states, rotation, finite

    def stream_for(self, state: dict) -> TextStream | MixtureStream:
        s = self.s
        if self.sources:
            return MixtureStream(self.sources, self.spec, block_size=s.block_size, last_block=s.last_block,
                                 state=MixtureState.from_dict(state), seed=s.seed, max_chunk_bytes=s.max_chunk_bytes,
                                 errors=s.encoding_errors, audit=s.audit, doc_starts=s.isolate_documents)
        if self.cache is not None:
            readers = cache_readers(self.cache)
        else:
            readers = text_readers(self.files, s.mode, s.text_field, s.max_chunk_bytes, s.encoding_errors)
        return TextStream(readers, self.sizes, self.spec, block_size=s.block_size, last_block=s.last_block,
                          state=StreamState.from_dict(state), finite=self.finite, audit=s.audit,
                          doc_starts=s.isolate_documents)

    def __iter__(self):
        info = get_worker_info()
        w, n_workers = (info.id, info.num_workers) if info else (0, 1)
        if n_workers != len(self.states):
            raise RuntimeError(f"{n_workers} dataloader workers for {len(self.states)} stream states")
        stream = self.stream_for(self.states[(w + self.rotation) % n_workers])
        pending: list[Block] = []
        n_trained = 0
        stream.max_run = self.s.micro_batch_size
        for blk in stream:  # the stream is paused here: stream.state is the state after `blk`
            pending.append(blk)
            n_trained += blk.count
            stream.max_run = max(self.s.micro_batch_size - n_trained, 1)
            if n_trained == self.s.micro_batch_size:
                yield self._batch(pending, stream)
                pending, n_trained = [], 0
                stream.max_run = self.s.micro_batch_size
        if pending:  # finite streams: the last, smaller batch
            yield self._batch(pending, stream)

    def _batch(self, blocks, stream) -> dict:
        batch = collate_blocks(blocks, self.spec, self.s, stream.state.to_dict())
        batch["meta"]["replaced_bytes"] = stream.replaced_bytes
        return batch


def initial_states(rank: int, world_size: int, workers: int, sources: list[Source] | None = None) -> list[dict]:
    n = world_size * workers
    if sources:
        return [MixtureState.fresh(rank * workers + w, n, sources).to_dict() for w in range(workers)]
    return [StreamState(rank * workers + w, n).to_dict() for w in range(workers)]


def make_loader(dataset, num_workers: int, prefetch_factor: int = 4) -> Loader:
    """Batches come pre-collated from the dataset. The loader gets a generator of its own: creating its
    iterator draws worker seeds, which must not consume the global torch RNG that dropout uses (a
    resumed run creates the iterator at another point of that RNG stream)."""
    kwargs = {"prefetch_factor": prefetch_factor, "persistent_workers": False,
              "worker_init_fn": functools.partial(ignore_stop_signals, parent=os.getpid())} if num_workers else {}
    return Loader(DataLoader(dataset, batch_size=None, num_workers=num_workers,
                             generator=torch.Generator().manual_seed(0), collate_fn=for_transfer, **kwargs))


def for_transfer(batch: dict) -> dict:
    """Batches are complete when the dataset yields them (the default collate would walk every meta field).
    In a loader worker, the batch crosses to the training process pickled through the worker's pipe, as
    numpy arrays (torch hands tensors over as shared-memory segments, one file descriptor each, at about
    1 ms per tensor, 13x the time of the whole batch's bytes through the pipe), and compacted: token ids
    in 16 bits where they fit, the attention mask as row lengths, the labels as the masked positions and
    their targets (`mlm_rows`/`mlm_targets`), document starts (data.isolate_documents) in 32 bits. 14 KB
    instead of 107 KB for 32 x 128 tokens; `Loader` rebuilds the int64 tensors, value for value."""
    return batch if get_worker_info() is None else compact(batch)


def compact(batch: dict) -> dict:
    """The wire form of a `collate_blocks` batch (see `for_transfer`)."""
    ids = batch["input_ids"].numpy()
    small = np.uint16 if ids.size and int(ids.max()) < 1 << 16 else np.int32
    starts = batch.get("doc_starts")
    return {"wire": (ids.astype(small), batch["attention_mask"].sum(1, dtype=torch.int32).numpy(),
                     batch["mlm_rows"].numpy().astype(np.int32), batch["mlm_targets"].numpy().astype(np.int32),
                     None if starts is None else starts.numpy().astype(np.int32)),
            "meta": batch["meta"]}


def from_wire(ids: np.ndarray, lengths: np.ndarray, rows: np.ndarray, targets: np.ndarray, starts: np.ndarray | None,
              meta: dict) -> dict:
    """The batch `collate_blocks` made, from its compact form (`for_transfer`)."""
    b, length = ids.shape
    labels = np.full((b, length), -100, dtype=np.int64)
    m = meta["n_masked"]  # rows past m pad the sparse head's rows to a multiple of 128 (target -100)
    labels.reshape(-1)[rows[:m]] = targets[:m]
    attn = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int64)
    out = {"input_ids": torch.from_numpy(ids.astype(np.int64)), "labels": torch.from_numpy(labels),
           "attention_mask": torch.from_numpy(attn), "mlm_rows": torch.from_numpy(rows.astype(np.int64)),
           "mlm_targets": torch.from_numpy(targets.astype(np.int64)), "meta": meta}
    if starts is not None:
        out["doc_starts"] = torch.from_numpy(starts.astype(np.int64))
    return out


class Loader:
    """Iterates a DataLoader, rebuilding batches sent compact by workers (`for_transfer`); pinned when a GPU
    will take them, so the host-to-device copy can be asynchronous."""

    def __init__(self, dataloader: DataLoader):
        self.dataloader = dataloader

    def __iter__(self):
        pin = torch.cuda.is_available()
        batches = iter(self.dataloader)
        mine = list(getattr(batches, "_workers", ()))
        _WORKERS[:] = [w for w in _WORKERS if w.is_alive()] + mine
        try:
            for batch in batches:
                if "wire" in batch:
                    batch = from_wire(*batch["wire"], batch["meta"])
                if pin:  # batches made in this process (no workers) too
                    batch = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                yield batch
        except Exception:  # a worker's error (bad input): the run ends, and so do its workers, at once
            kill(mine)
            raise


_WORKERS: list = []  # this process's loader worker processes (multiprocessing.Process), for _kill_workers


def kill(workers: list) -> None:
    """Workers ignore SIGTERM (below) and hold nothing to save: SIGKILL them and reap them. torch's SIGCHLD
    handler, which would report a killed worker as an error of its own, is set aside meanwhile. (Left to the
    DataLoader, ending them takes 2 x 5 s of join timeouts after a worker's error.)"""
    alive = [w for w in workers if w.is_alive()]
    if not alive:
        return
    previous = signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for w in alive:
        os.kill(w.pid, signal.SIGKILL)
    for w in alive:
        w.join()
    signal.signal(signal.SIGCHLD, previous)


@atexit.register  # after multiprocessing's own exit handler was registered (on import): runs before it
def _kill_workers() -> None:
    """multiprocessing's exit handler ends daemon children with SIGTERM and then joins them, so a training process
    leaving on an error with its loader still open (a dead peer rank, any crash) would wait forever for its
    workers: kill them first."""
    kill(_WORKERS)


def ignore_stop_signals(_worker_id: int, parent: int | None = None) -> None:
    """Schedulers signal every process of a job. Workers must survive SIGTERM/SIGUSR1 so the training
    process can fetch batches up to the step boundary where it checkpoints; it ends them itself. But a
    worker must not outlive its training process: if that dies (SIGKILL, a crash), the kernel kills the
    worker at once (Linux parent-death signal). Without it, DeepSpeed's launcher waits up to 30 s for the
    workers of a dead rank, which ignore its SIGTERM, before the job ends."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    if sys.platform == "linux" and parent is not None:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)
