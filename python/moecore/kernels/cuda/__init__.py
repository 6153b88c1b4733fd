"""The GPU kernels (``cuda/*.cu``) and the host code that drives them, for CuPy arrays.

One module per kernel family of ``cuda/``: :mod:`.topk`, :mod:`.codec` (decompression
scatter), :mod:`.adamw`, :mod:`.moe`, :mod:`.bsr` and :mod:`.fp8` (FP8 quantization).
Each public function takes device arrays
and returns device arrays; it validates its inputs (dtype, shape, contiguity, device), chooses
the launch shape and runs its family's kernels through a :class:`Backend`
(:mod:`.launch`: the CuPy backend by default, the test suite's CPU emulation otherwise).
:mod:`.sources` reads the kernel sources embedded in the wheel, :mod:`.moe_kernels` is the
CUDA implementation of :class:`moecore.kernels.MoEKernels` (chosen by
:mod:`moecore.kernels.registry` for float32 CuPy arrays), and :mod:`.compile_check`
is ``moecore check-cuda`` (every kernel compiled with NVRTC, no GPU needed).

Exactness, compared with the CPU kernels in ``moecore._core``:

- top-k selection is exact and returns the same indices (increasing, ties to the lower index)
  and values as the CPU's exact method, for ``method="exact"`` and ``"sampled"`` alike (the
  sampled threshold only narrows the candidates; ``exact_k=False`` does not apply); error
  feedback leaves the same residual bit for bit (f32 values);
- decompression scatter and AdamW are bit-identical (no fused multiply-add);
- MoE routing picks the same experts unless two choice scores are within rounding of each
  other (``expf`` differs by an ulp or two from the CPU's); permutation orders and counts are
  identical; unpermute, its backward and the BSR products agree to float rounding.
"""

from __future__ import annotations

from moecore.kernels.cuda.adamw import adamw_scalars, adamw_step
from moecore.kernels.cuda.bsr import BsrDevice, bsr_linear, bsr_linear_dw, bsr_linear_dx
from moecore.kernels.cuda.codec import scatter
from moecore.kernels.cuda.launch import (
    THREADS,
    Backend,
    CupyBackend,
    default_backend,
    launch_grid,
)
from moecore.kernels.cuda.moe import (
    moe_permute,
    moe_permute_backward,
    moe_route,
    moe_unpermute,
    moe_unpermute_backward,
)
from moecore.kernels.cuda.topk import topk_error_feedback, topk_select

__all__ = [
    "THREADS",
    "Backend",
    "BsrDevice",
    "CupyBackend",
    "adamw_scalars",
    "adamw_step",
    "bsr_linear",
    "bsr_linear_dw",
    "bsr_linear_dx",
    "default_backend",
    "launch_grid",
    "moe_permute",
    "moe_permute_backward",
    "moe_route",
    "moe_unpermute",
    "moe_unpermute_backward",
    "scatter",
    "topk_error_feedback",
    "topk_select",
]
