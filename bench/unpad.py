"""Pad-free fine-tuning batches (task.unpad) against padded ones: training steps (forward + backward) of
all-MiniLM-L6-v2 on MRPC micro-batches of 32, side by side in one run.

    python bench/unpad.py [--steps 30] [--rounds 3]

Batches come in two orders: random (HF's chapter-3 recipe: much padding) and length-grouped (our default:
little padding). Each (order, path) is timed over the same micro-batches, the paths alternating over
`--rounds` rounds (fastest kept). Reports real (non-pad) tokens per second. On a GPU the steps run in bf16
autocast. Writes bench/results/unpad_<machine>.json.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.env import bench_parser, machine_info, write_result  # noqa: E402

MRPC = REPO.parent / "shared" / "data" / "mrpc" / "train.tsv"


def load_mrpc(tokenizer):
    from bertlaunch.data.tables.pairs import encode_pairs
    from bertlaunch.data.tables.read import read_rows

    rows = read_rows(str(MRPC)).rows
    return encode_pairs(tokenizer, [r["#1 String"] for r in rows], [r["#2 String"] for r in rows],
                        [int(r["Quality"]) for r in rows], max_length=128)


def time_steps(model, enc, batches, device, unpad: bool) -> dict:
    import torch

    from bertlaunch.data.tables.pairs import collate

    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    real = 0
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu",
                                                                                                     enabled=False)
    for i, idx in enumerate([batches[0]] + batches):  # the first step warms up, untimed
        if i == 1:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        b = collate(enc, idx, 0, False, unpad=unpad)
        kw = {k: v.to(device, non_blocking=True) for k, v in b.items() if k != "meta"}
        if unpad:
            kw["max_len"] = b["meta"]["max_len"]
        with amp:
            loss = model(**kw)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        real += b["meta"]["n_real"] if i else 0
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return {"seconds": dt, "real_tokens": real, "real_tokens_per_s": real / dt}


def main() -> None:
    import numpy as np
    import torch

    from bertlaunch.core.config import ModelConfig
    from bertlaunch.data.corpus.embedded import minilm_dir
    from bertlaunch.data.tables.pairs import pad_fraction
    from bertlaunch.data.tokenize import load_hf_tokenizer
    from bertlaunch.model.classify import Classifier, load_classifier

    ap = bench_parser(__doc__)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = load_hf_tokenizer(str(minilm_dir()))
    enc = load_mrpc(tokenizer)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(enc))[: args.steps * args.batch]
    orders = {"random": [order[i:i + args.batch] for i in range(0, len(order), args.batch)]}
    by_len = order[np.argsort(enc.lengths[order], kind="stable")]  # ideal grouping: an upper bound on its gain
    grouped = [by_len[i:i + args.batch] for i in range(0, len(by_len), args.batch)]
    orders["grouped"] = [grouped[i] for i in rng.permutation(len(grouped))]
    torch.manual_seed(0)
    hf, _ = load_classifier(ModelConfig(pretrained=str(minilm_dir())), str(minilm_dir()), 2, None, False,
                            len(tokenizer))
    model = Classifier(hf.to(device), regression=False).train()
    res = {"machine": machine_info(), "command": " ".join(sys.argv), "steps": args.steps, "batch": args.batch,
           "model": "all-MiniLM-L6-v2", "data": "MRPC train", "pad_fraction": {
               name: pad_fraction(enc, batches, args.batch) for name, batches in orders.items()}}
    for _ in range(args.rounds):
        for name, batches in orders.items():
            for unpad in (False, True):
                key = f"{name}_{'unpadded' if unpad else 'padded'}"
                r = time_steps(model, enc, batches, device, unpad)
                if key not in res or r["seconds"] < res[key]["seconds"]:
                    res[key] = r
    res["summary"] = {f"{name}_unpadded_vs_padded": res[f"{name}_unpadded"]["real_tokens_per_s"]
                      / res[f"{name}_padded"]["real_tokens_per_s"] for name in orders}
    res["summary"].update({f"{name}_pad_fraction": res["pad_fraction"][name] for name in orders})
    write_result(res, "unpad", args.out)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
