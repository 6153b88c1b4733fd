"""moecore in PyTorch: the MoE layer and a block-sparse linear as ``torch.nn.Module`` s over
moecore's kernels, and a DDP communication hook compressing gradients with moecore's top-k.

Importing this module imports torch (which moecore never depends on)::

    from moecore.integrations.torch import MoE, BlockSparseLinear, TopKHookState, topk_hook

Tensors cross into moecore through DLPack without a copy (:func:`moecore.backend.as_array`),
and moecore's results come back the same way. Imported before torch, it sets
``OMP_WAIT_POLICY=PASSIVE`` so torch's idle OpenMP workers do not spin on the cores moecore's
threads need (:data:`OPENMP_PASSIVE`; ``MOECORE_OMP_PASSIVE=0`` opts out). See
docs/embedding.md.
"""

from __future__ import annotations

from moecore.integrations.torch._openmp import prefer_passive_openmp

#: Whether torch's OpenMP workers sleep at once after each op (see ``_openmp``): decided
#: here, before torch loads its OpenMP runtime, if this module is imported first.
OPENMP_PASSIVE = prefer_passive_openmp()

try:
    import torch  # noqa: F401  (fails early, with the reason, when torch is missing)
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "moecore.integrations.torch needs PyTorch (pip install torch); moecore itself does not"
    ) from exc

# After the OpenMP setting and the torch check, on purpose (hence E402).
from moecore.integrations.torch.ddp import TopKHookState, topk_hook  # noqa: E402
from moecore.integrations.torch.moe import MoE, MoEFunction  # noqa: E402
from moecore.integrations.torch.sparse import BlockSparseLinear, BsrLinearFunction  # noqa: E402

__all__ = [
    "OPENMP_PASSIVE",
    "BlockSparseLinear",
    "BsrLinearFunction",
    "MoE",
    "MoEFunction",
    "TopKHookState",
    "topk_hook",
]
