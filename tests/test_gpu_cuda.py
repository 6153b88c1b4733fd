"""The GPU path end to end on a real CUDA device: dispatch of ``moecore.compress``,
``moecore.sparse`` and the MoE kernels to ``cuda/*.cu``, and a short training run on CUDA
against the same run on the CPU. The kernels themselves are also checked one by one on CUDA
by ``test_gpu_emu.py`` (its ``cuda`` parametrisation). Without a GPU every test here skips,
saying why."""

from __future__ import annotations

import numpy as np
import pytest

import moecore as mc
from moecore import _core, compress, nn, sparse
from moecore.kernels import cuda, moe_kernels_for
from moecore.kernels.cuda import sources
from moecore.optim import AdamW

pytestmark = pytest.mark.gpu


def test_every_family_builds_with_rawmodule_on_the_device(cupy):
    be = cuda.default_backend()
    for family in sources.families():
        mod = be.module(family)
        for name in sources.kernel_names(family):
            assert mod.get_function(name) is not None


def test_launch_checks_contiguity_and_scalar_types(cupy):
    x = cupy.zeros((8, 8), np.float32)[:, ::2]
    with pytest.raises(ValueError, match="C-contiguous"):
        cuda.default_backend().launch("codec", "codec_scatter", (1,), (32,), x, np.int32(0), None,
                                     None, np.int32(0))  # fmt: skip
    with pytest.raises(TypeError, match="typed scalar"):
        cuda.default_backend().launch("codec", "codec_scatter", (1,), (32,), cupy.zeros(4, np.float32),
                                     4, None, None, np.int32(0))  # fmt: skip


def test_topk_compress_on_cupy_equals_the_cpu_exact_payload(cupy):
    rng = np.random.default_rng(0)
    c_gpu = compress.TopK(ratio=0.01, method="exact", error_feedback=True)
    c_cpu = compress.TopK(ratio=0.01, method="exact", error_feedback=True)
    for _ in range(3):
        g = rng.standard_normal(100_000).astype(np.float32)
        p_gpu, _ = c_gpu.compress(cupy.asarray(g), name="w")
        p_cpu, _ = c_cpu.compress(g, name="w")
        np.testing.assert_array_equal(p_gpu, p_cpu)
    np.testing.assert_array_equal(cupy.asnumpy(c_gpu.residual("w")), c_cpu.residual("w"))


def test_decompress_sum_into_cupy_matches_the_cpu(cupy):
    rng = np.random.default_rng(1)
    payloads = [
        _core.compress_topk(rng.standard_normal(5000).astype(np.float32), 100, method="exact")
        for _ in range(4)
    ]
    out = rng.standard_normal(5000).astype(np.float32)
    out_gpu = cupy.asarray(out)
    compress.decompress_sum(payloads, out_gpu, scale=0.25)
    compress.decompress_sum(payloads, out, scale=0.25)
    np.testing.assert_allclose(cupy.asnumpy(out_gpu), out, rtol=1e-6, atol=1e-7)


def test_sparse_on_cupy_matches_the_cpu(cupy):
    w = sparse.BsrMatrix.random((64, 48), 16, density=0.5, seed=0)
    x = np.random.default_rng(2).standard_normal((2, 5, 48)).astype(np.float32)
    dy = np.random.default_rng(3).standard_normal((2, 5, 64)).astype(np.float32)
    for got, want in [
        (sparse.bsr_linear(cupy.asarray(x), w), sparse.bsr_linear(x, w)),
        (sparse.bsr_linear_dx(cupy.asarray(dy), w), sparse.bsr_linear_dx(dy, w)),
        (
            sparse.bsr_linear_dw(cupy.asarray(dy), cupy.asarray(x), w),
            sparse.bsr_linear_dw(dy, x, w),
        ),
    ]:
        np.testing.assert_allclose(cupy.asnumpy(got), want, rtol=1e-5, atol=1e-5)


def test_moe_kernels_dispatch_to_cuda_and_refuse_what_has_no_kernel(cupy):
    a = cupy.zeros((4, 4), np.float32)
    kern = moe_kernels_for(a)
    assert kern.__name__ == "moecore.kernels.cuda.moe_kernels"
    with pytest.raises(NotImplementedError, match="n_groups"):
        kern.route(a, 1, n_groups=2, topk_groups=1)
    with pytest.raises(NotImplementedError, match="capacity"):
        kern.permute(a, cupy.zeros((4, 1), np.int32), 4, capacity=2, weights=a[:, :1].copy())


def test_short_training_run_on_cuda_follows_the_cpu(cupy):
    def run(device: str) -> list[float]:
        mc.manual_seed(0)
        layer = nn.MoE(16, 32, n_experts=4, top_k=2)
        x_np = np.random.default_rng(4).standard_normal((64, 16)).astype(np.float32)
        target = np.random.default_rng(5).standard_normal((64, 16)).astype(np.float32)
        layer.to(device)
        x, t = mc.Tensor(x_np).to(device), mc.Tensor(target).to(device)
        opt = AdamW(layer.parameters(), lr=1e-2)
        losses = []
        for _ in range(5):
            opt.zero_grad()
            loss = ((layer(x) - t) ** 2).mean()
            loss.backward()
            opt.step()
            losses.append(float(loss.numpy()))
        return losses

    np.testing.assert_allclose(run("cuda"), run("cpu"), rtol=1e-4)
