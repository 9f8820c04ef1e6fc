"""InfoNCE (multiple-negatives ranking) over the whole global batch, gathered from every rank, in two ways with the
same loss and gradients: one forward per micro-batch (plain), or GradCache (embed everything without gradients,
take the loss, recompute each micro-batch with the embeddings' gradients).

Layout: a rank's rows of a step (or of a micro-batch) are `cols` blocks of n rows: queries, positives(, hard
negatives), flattened to [cols * n, H]. Gathered in rank order, query i of the global batch is scored against every
positive and every hard negative of the global batch; its own positive is the target:

    loss = sum_i CE(q_i . [P; N]^T / temperature, i) / rows of the step

Each rank takes the cross-entropy of its own queries; the all-gather's backward sums the ranks' gradients of every
row, so the gradient of the one global loss reaches each rank's rows. DeepSpeed averages gradients over ranks and
accumulation steps, so each rank's part is scaled by world x accumulation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bertlaunch.core import dist


def local_cross_entropy(gathered: torch.Tensor, counts: list[int], rank: int, cols: int,
                        temperature: float) -> torch.Tensor:
    """Summed cross-entropy of this rank's queries. gathered: [sum(cols * counts), H], rank by rank each
    [cols, counts[r], H] flattened; counts: rows per rank."""
    blocks, start = [], 0
    for n in counts:
        blocks.append(gathered[start:start + cols * n].view(cols, n, -1))
        start += cols * n
    docs = torch.cat([torch.cat([b[c] for b in blocks]) for c in range(1, cols)])  # [(cols - 1) * N, H]
    queries = blocks[rank][0]  # [n_rank, H]
    offset = sum(counts[:rank])
    labels = torch.arange(offset, offset + counts[rank], device=queries.device)  # own positive: row of P
    scores = queries @ docs.T / temperature  # [n_rank, (cols - 1) * N]
    return F.cross_entropy(scores.float(), labels, reduction="sum")


def plain_loss(emb: torch.Tensor, counts: list[int], rank: int, cols: int, temperature: float, scale: float
               ) -> torch.Tensor:
    """A micro-batch encoded with gradients: emb [cols * counts[rank], H]; counts: the micro-batch's rows on every
    rank. scale = world x accumulation / rows of the step."""
    if not sum(counts):  # an empty slot of a short last batch, empty on every rank: no collective
        return emb.sum() * 0.0
    gathered = dist.gather_rows(emb, [cols * n for n in counts])
    return local_cross_entropy(gathered, counts, rank, cols, temperature) * scale


def rng_state():
    return torch.get_rng_state(), (torch.cuda.get_rng_state() if torch.cuda.is_available() else None)


def set_rng_state(state) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1])


class GradCache:
    """One step of GradCache (Gao et al. 2021) for this rank's `chunks` (its micro-batches of the step).

    cache(): every chunk encoded without gradients (the RNG state before each is kept, so its recompute draws the
    same dropout), the rank's rows gathered from all ranks, the loss and its gradient with respect to this rank's
    embeddings. loss(a): chunk a encoded again with gradients; its value is the step's loss, its gradient that of
    the cached embedding gradients: emb . g summed, i.e. the chain rule through the embeddings."""

    def __init__(self, encode, chunks: list[dict], share: list[int], rank: int, cols: int, temperature: float,
                 n_step: int, world: int, accum: int):
        self.encode, self.chunks, self.cols, self.world, self.accum = encode, chunks, cols, world, accum
        self.sizes = [c["meta"]["n"] for c in chunks]
        embs, self.states = [], []
        with torch.no_grad():
            for chunk in chunks:
                self.states.append(rng_state())
                embs.append(self._rows(chunk, encode(chunk)))
        self.after = rng_state()
        hidden = embs[0].shape[-1]
        own = torch.cat(embs, 1).reshape(-1, hidden)  # [cols, n_rank, H] -> [cols * n_rank, H]
        leaf = own.detach().requires_grad_()
        with torch.enable_grad():
            gathered = dist.gather_rows(leaf, [cols * n for n in share])
            ce = local_cross_entropy(gathered, share, rank, cols, temperature) / n_step
            ce.backward()  # the gather's backward sums every rank's part of the gradient of the rows
        grads = leaf.grad.view(cols, -1, hidden)
        self.grads = list(grads.split(self.sizes, dim=1))  # per chunk [cols, n_a, H]
        self.value = ce.detach() * world  # mean over ranks and chunks = the step's loss

    def _rows(self, chunk: dict, emb: torch.Tensor) -> torch.Tensor:
        """Chunk embeddings [cols * n, H] (one pad row when n = 0) -> [cols, n, H]."""
        n = chunk["meta"]["n"]
        return emb[:self.cols * n].view(self.cols, n, -1)

    def loss(self, a: int) -> torch.Tensor:
        set_rng_state(self.states[a])
        emb = self._rows(self.chunks[a], self.encode(self.chunks[a]))
        set_rng_state(self.after)
        surrogate = (emb * self.grads[a]).sum() * (self.world * self.accum)
        return self.value + (surrogate - surrogate.detach())
