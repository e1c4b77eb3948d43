"""The continuous batch's fp32 matrix products on oneDNN instead of torch's default BLAS (CPU).

torch's eager fp32 `addmm` / `linear` on CPU call MKL's sgemm, which takes its AVX2 code path on
AMD CPUs; oneDNN, also inside torch, uses AVX-512 wherever the CPU has it. Measured on this
project's 2-core AMD EPYC (AVX-512), one thread, [32, 768] x [768, 3072] (a GPT-2-small MLP
product at 32 rows): MKL 73-78 GFLOP/s, oneDNN 149-195; at 700 rows (a prefill) 96-103 against
~200. The matrix products are ~73 % of a decode step, so a step costs ~1.5x less CPU.

Same precision: fp32 in, fp32 accumulation, fp32 out (no TF32 / bf16). The sums run in another
order, so values differ in the last bits, as they already do with MKL between batch sizes (a row
computed in a batch of 1 and of 32 differs there too); greedy ids equal `model.generate`'s in the
tests and on the benchmark's 64 prompts (bench/NOTES.md).

Scope: a TorchFunctionMode, which is thread-local, entered around the scheduler's prefill and
decode on the engine worker only (generation/scheduler.py); beam search, the tensor API and every
other thread keep torch's default kernels. Only 2-D (addmm) or N-D (linear) float32 CPU products
with a 1-D bias or none, outside autograd, are routed; anything else runs as before.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


def available() -> bool:
    """oneDNN is built into this torch and offers the fused linear operator."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        return torch.ops.mkldnn._linear_pointwise.default is not None
    except (AttributeError, RuntimeError):
        return False


_PLAIN = (torch.Tensor, torch.nn.Parameter)  # not tensor subclasses with their own dispatch


def _eligible(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    tensors = (x, weight) if bias is None else (x, weight, bias)
    return (not torch.is_grad_enabled() and weight.dim() == 2 and x.dim() >= 2
            and (bias is None or (bias.dim() == 1 and bias.shape[0] == weight.shape[0]))
            and all(type(t) in _PLAIN and t.dtype == torch.float32 and t.device.type == "cpu"
                    and t.layout == torch.strided for t in tensors))


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weight.T + bias; `weight` [out, in], any strides (a Conv1D's [in, out] weight transposed is a view)."""
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight, bias, "none", [], "")


class OneDnnMatmuls(TorchFunctionMode):
    """While active (on the entering thread): `torch.addmm(bias, x, w)` (transformers' Conv1D, GPT-2)
    and `F.linear(x, w, bias)` run as oneDNN's linear."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.addmm and len(args) == 3 and not kwargs:
            bias, x, weight = args
            if x.dim() == 2 and bias.dim() == 1 and _eligible(x, weight.t(), bias):
                return _linear(x, weight.t(), bias)
        elif func is F.linear and 2 <= len(args) + len(kwargs) <= 3:
            named = dict(zip(("input", "weight", "bias"), args, strict=False)) | kwargs
            if set(named) <= {"input", "weight", "bias"} and "weight" in named:
                x, weight, bias = named.get("input"), named["weight"], named.get("bias")
                if isinstance(x, torch.Tensor) and _eligible(x, weight, bias):
                    return _linear(x, weight, bias)
        return func(*args, **kwargs)


def matmul_mode(enabled: bool):
    """The context for a generation forward pass: OneDnnMatmuls when `enabled`, else nothing."""
    return OneDnnMatmuls() if enabled else contextlib.nullcontext()
