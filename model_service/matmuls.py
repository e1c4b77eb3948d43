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

Scope: the model's `nn.Linear` and transformers `Conv1D` modules (exactly those classes) get a
subclass (install(), once) whose forward takes oneDNN only while the calling thread is inside
`routed()`, which the scheduler enters around its prefill and decode on the engine worker; beam
search, the tensor API and every other thread run torch's default kernels. Only float32 CPU
products outside autograd are routed. A subclass (not a TorchFunctionMode, which would see all of a
step's ~850 torch calls: 7 % of a 32-row GPT-2-small step) costs one check per linear layer.

The same way, `fused_gelu()` runs transformers' `NewGELUActivation` (GPT-2's "gelu_new", written as 8
elementwise operators: pow, mul, add, mul, tanh, add, mul, mul) as torch's one fused operator
`F.gelu(approximate="tanh")`: the same formula, rounded differently in the last bits (transformers'
`GELUTanh` says as much), greedy ids equal `model.generate`'s in the tests and on the benchmark's 64 prompts.
Each of those operators over a [32, 3072] step is a parallel region of its own, i.e. a barrier where the
intra-op threads wait for each other (they sleep there when libgomp's pools hold more threads than the
CPUs: docs/generation.md): in process, a 32-row GPT-2-small decode step with 2 threads made 201 instead
of 369 voluntary context switches, and with 1 thread took 3.4-3.7 against 3.9-4.5 CPU-s per 32 prompts
(load ~20, bench/NOTES.md stop 21).
"""

from __future__ import annotations

import contextlib
import threading

import torch
from torch import nn
from torch.nn import functional as F
from transformers.activations import NewGELUActivation
from transformers.pytorch_utils import Conv1D

_state = threading.local()


def available() -> bool:
    """oneDNN is built into this torch and offers the fused linear operator."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        return torch.ops.mkldnn._linear_pointwise.default is not None
    except (AttributeError, RuntimeError):
        return False


def _routed_here(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (getattr(_state, "on", False) and not torch.is_grad_enabled() and x.dtype == weight.dtype == torch.float32
            and x.device.type == "cpu" and weight.device.type == "cpu")


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """oneDNN's fp32 x @ weight.T + bias (also packed_bert's encoder products); `weight` [out, in], any
    strides (a Conv1D's [in, out] weight transposed is a view)."""
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight, bias, "none", [], "")


class OneDnnLinear(nn.Linear):
    def forward(self, x):
        if _routed_here(x, self.weight):
            return linear(x, self.weight, self.bias)
        return super().forward(x)


class OneDnnConv1D(Conv1D):
    """transformers' Conv1D (GPT-2): weight [in, out], x @ weight + bias."""

    def forward(self, x):
        if _routed_here(x, self.weight):
            return linear(x, self.weight.t(), self.bias)
        return super().forward(x)


class FusedNewGELU(NewGELUActivation):
    """transformers' NewGELUActivation, as one fused operator inside fused_gelu() on this thread."""

    def forward(self, x):
        if getattr(_state, "gelu", False) and not torch.is_grad_enabled():
            return F.gelu(x, approximate="tanh")
        return super().forward(x)


_SUBCLASS = {nn.Linear: OneDnnLinear, Conv1D: OneDnnConv1D, NewGELUActivation: FusedNewGELU}


def install(model: nn.Module) -> int:
    """Give the model's nn.Linear, Conv1D and NewGELUActivation modules the routing subclass (same
    parameters, same behaviour outside routed() / fused_gelu()); the number of modules changed."""
    count = 0
    for module in model.modules():
        subclass = _SUBCLASS.get(type(module))
        if subclass is not None:
            module.__class__ = subclass
            count += 1
    return count


@contextlib.contextmanager
def _on(flag: str):
    before = getattr(_state, flag, False)
    setattr(_state, flag, True)
    try:
        yield
    finally:
        setattr(_state, flag, before)


def routed():
    """Within: this thread's passes through installed modules run their products on oneDNN."""
    return _on("on")


def fused_gelu():
    """Within: this thread's passes through installed NewGELUActivation modules run one fused operator."""
    return _on("gelu")


def step_kernels(onednn: bool, gelu: bool):
    """The context for a generation forward pass: routed() when `onednn`, fused_gelu() when `gelu`."""
    stack = contextlib.ExitStack()
    if onednn:
        stack.enter_context(routed())
    if gelu:
        stack.enter_context(fused_gelu())
    return stack
