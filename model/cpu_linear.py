"""model.cpu_linear=onednn: the fp32 matrix products of every nn.Linear, forward and backward, by oneDNN (shipped
inside torch) instead of torch's default BLAS, on the CPU.

Why: torch's CPU linear layers go to MKL, and MKL runs its AVX2 code on AMD processors. oneDNN runs AVX-512 there:
on a 2-core AMD EPYC (Zen 5) it multiplies MiniLM's shapes 2.1x (forward, input gradient) and 1.5x (weight
gradient) faster than MKL, in full fp32 (no bf16 rounding; oneDNN's default math mode). The results equal torch's
to rounding (tests/test_cpu_linear.py); oneDNN's products are deterministic at a fixed thread count, so a resumed
run repeats an unbroken one bit for bit as before.

For y = x W^T + b with x [..., K] (flattened to [M, K]), W [N, K], dy [M, N]:
  forward  y  = x W^T + b      one oneDNN product [M, K] x [K, N] (+ bias fused)
  backward dx = dy W           [M, N] x [N, K]
           dW = dy^T x         [N, M] x [M, K]
           db = dy summed over M
Any other case (not the CPU, not fp32, no rows, under autocast) takes torch's F.linear, so a module can keep the swapped
forward wherever it runs.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn


def onednn_available() -> str | None:
    """Why oneDNN's linear cannot run in this torch build, or None."""
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return "this torch build has no oneDNN (mkldnn) linear kernel"
    return None


def _product(a: torch.Tensor, b_t: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """a [M, K] x b_t^T, b_t [N, K] (+ bias [N]) -> [M, N], by oneDNN (strided views are read as they are)."""
    return torch.ops.mkldnn._linear_pointwise(a, b_t, bias, "none", [], "")


class _OneDNNLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        y = _product(x.reshape(-1, x.shape[-1]), weight, bias)  # [M, N]
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, weight = ctx.saved_tensors
        dy2, x2 = dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1])  # [M, N], [M, K]
        dx = _product(dy2, weight.t()).view_as(x) if ctx.needs_input_grad[0] else None  # [M, N] x [N, K]
        dw = _product(dy2.t(), x2.t()) if ctx.needs_input_grad[1] else None  # [N, M] x [M, K]
        db = dy2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dw, db


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear with oneDNN's products for fp32 CPU tensors outside autocast; F.linear itself otherwise."""
    if (x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32 or x.numel() == 0
            or torch.is_autocast_enabled("cpu")):
        return F.linear(x, weight, bias)
    return _OneDNNLinear.apply(x, weight, bias)


def _forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return onednn_linear(x, self.weight, self.bias)


def use_onednn_linears(module: nn.Module) -> int:
    """Every nn.Linear in `module` multiplies with oneDNN from now on (its forward is replaced on the instance: the
    parameters, the state dict and the module hooks, which ZeRO-3 gathers its weights in, stay as they are).
    Returns how many layers; ValueError naming the key when this torch cannot."""
    why = onednn_available()
    if why:
        raise ValueError(f"model.cpu_linear=onednn: {why}; set model.cpu_linear=torch")
    layers = [m for m in module.modules() if isinstance(m, nn.Linear)]
    for m in layers:
        m.forward = types.MethodType(_forward, m)
    return len(layers)
