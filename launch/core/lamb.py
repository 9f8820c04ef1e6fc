"""LAMB (You et al. 2019, "Large Batch Optimization for Deep Learning"), the optimizer of NVIDIA's and
academic-budget BERT recipes at large batch sizes, for the CPU (and any device DeepSpeed's FusedLamb does not
serve). On GPUs the engine hands train.optimizer=lamb to DeepSpeed's fused kernel instead.

Per tensor: Adam's bias-corrected direction u = m_hat / (sqrt(v_hat) + eps) + weight_decay x w, scaled by
the trust ratio ||w|| / ||u|| (1 when either norm is 0), so every layer moves by about lr x its own norm.
Deterministic: the same state gives the same update, so a resumed run continues bit-identically.
"""

from __future__ import annotations

import torch


class Lamb(torch.optim.Optimizer):
    def __init__(self, params, lr: float, betas=(0.9, 0.999), eps: float = 1e-6, weight_decay: float = 0.0,
                 max_trust: float = 10.0):
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay,
                                  "max_trust": max_trust})

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                t = float(state["step"])
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(b1).add_(p.grad, alpha=1 - b1)  # [shape of p]
                v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                update = (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt_().add_(group["eps"]))
                if group["weight_decay"]:
                    update.add_(p, alpha=group["weight_decay"])
                w_norm, u_norm = p.norm(), update.norm()
                trust = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, torch.ones_like(w_norm))
                p.sub_(update * (group["lr"] * trust.clamp(max=group["max_trust"])))
        return loss
