"""Every CUDA kernel, executed on the CPU through the emulation harness (``_gpu_emu``) and the
unchanged host code of ``moecore.kernels.cuda``, compared with the CPU path (the Rust kernels)
or numpy. ``.ci/run`` runs this file again under ThreadSanitizer and AddressSanitizer
(``MOECORE_EMU_SANITIZER``); the last tests prove TSan catches a missing ``__syncthreads()``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from _gpu_emu import SANITIZER, EmuBackend

from moecore import _core, moe_kernels
from moecore.kernels import cuda
from moecore.kernels.cuda import sources
from moecore.sparse import BsrMatrix, bsr_linear, bsr_linear_dw, bsr_linear_dx

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="the emulation needs g++")


_EMU = EmuBackend()  # one per module: its launch log proves every kernel ran


def _cuda_backend() -> cuda.Backend:
    try:
        import cupy
    except ImportError:
        pytest.skip("CuPy is not installed (pip install moecore[gpu])")
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            pytest.skip("no CUDA device")
    except Exception as exc:
        pytest.skip(f"no CUDA device: {exc}")
    return cuda.default_backend()


@pytest.fixture(scope="module", params=["emu", pytest.param("cuda", marks=pytest.mark.gpu)])
def be(request: pytest.FixtureRequest) -> cuda.Backend:
    """The same host code on emulated kernels (CPU) or, where there is a GPU, on CUDA."""
    return _EMU if request.param == "emu" else _cuda_backend()


def dev(be: cuda.Backend, a: np.ndarray | None) -> object:
    return None if a is None else be.xp.asarray(a)


def host(be: cuda.Backend, a: object) -> np.ndarray:
    return be.to_host(a)


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


# --- top-k ----------------------------------------------------------------------------------


def reference_topk(x: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest |x|, ties to the lower index, increasing: by sorting."""
    order = np.lexsort((np.arange(x.size), -np.abs(x.astype(np.float64))))
    return np.sort(order[:k])


@pytest.mark.parametrize(
    ("n", "k"), [(1, 1), (37, 5), (300, 1), (300, 300), (1000, 77), (2500, 400)]
)
def test_topk_select_matches_the_cpu_exact_method(be: cuda.Backend, n: int, k: int) -> None:
    x = rng(n).standard_normal(n).astype(np.float32)
    idx, val = (host(be, a) for a in cuda.topk_select(dev(be, x), k, be))
    cpu = _core.compress_select(x, k, method="exact")
    np.testing.assert_array_equal(idx, cpu.astype(np.int32))
    np.testing.assert_array_equal(idx, reference_topk(x, k))
    np.testing.assert_array_equal(val, x[idx])


def test_topk_ties_go_to_the_lower_index(be: cuda.Backend) -> None:
    # Many equal magnitudes of both signs, spread over several tiles: the k-th largest value
    # is shared by far more entries than are taken.
    x = np.where(rng(3).random(1500) < 0.5, -0.25, 0.25).astype(np.float32)
    x[[10, 700, 1400]] = [1.0, -2.0, 1.5]
    for k in (3, 4, 50, 1499):
        idx = host(be, cuda.topk_select(dev(be, x), k, be)[0])
        np.testing.assert_array_equal(idx, _core.compress_select(x, k, method="exact"))
        np.testing.assert_array_equal(idx, reference_topk(x, k))


def test_topk_keys_differing_only_in_low_bits(be: cuda.Backend) -> None:
    # Consecutive floats: the third radix pass (bits 8..0) decides.
    base = np.float32(1.0).view(np.uint32)
    x = (base + rng(4).permutation(600).astype(np.uint32)).view(np.float32)
    idx = host(be, cuda.topk_select(dev(be, x), 123, be)[0])
    np.testing.assert_array_equal(idx, reference_topk(x, 123))


def test_topk_zero_k_and_errors(be: cuda.Backend) -> None:
    x = rng(5).standard_normal(100).astype(np.float32)
    idx, val = cuda.topk_select(dev(be, x), 0, be)
    assert idx.size == 0 and val.size == 0
    with pytest.raises(ValueError, match="k must be"):
        cuda.topk_select(dev(be, x), 101, be)
    with pytest.raises(TypeError, match="float32"):
        cuda.topk_select(dev(be, x.astype(np.float64)), 3, be)
    x[42] = np.nan
    x[77] = np.inf
    with pytest.raises(ValueError, match="index 42"):
        cuda.topk_select(dev(be, x), 3, be)


def test_count_at_least_counts_with_warp_votes(be: cuda.Backend) -> None:
    x = rng(6).standard_normal(1111).astype(np.float32)
    for t in (0.0, 0.5, 2.0, 10.0):
        count = dev(be, np.zeros(1, np.uint32))
        key = np.float32(t).view(np.uint32)
        be.launch(
            "topk", "topk_count_at_least", (3,), (64,), dev(be, x), np.int32(x.size), key, count
        )
        assert int(host(be, count)[0]) == int((np.abs(x) >= np.float32(t)).sum())


def test_topk_error_feedback_leaves_the_cpu_residual(be: cuda.Backend) -> None:
    n, k = 2000, 60
    r_cpu = rng(7).standard_normal(n).astype(np.float32)
    r_gpu = dev(be, r_cpu.copy())
    for step in range(3):
        g = rng(10 + step).standard_normal(n).astype(np.float32)
        idx, val = (host(be, a) for a in cuda.topk_error_feedback(r_gpu, dev(be, g), k, be))
        payload = _core.compress_topk(g, k, method="exact", index="raw", residual=r_cpu)
        cpu_idx, cpu_val, _ = _core.compress_decode(payload)
        np.testing.assert_array_equal(idx, cpu_idx.astype(np.int32))
        np.testing.assert_array_equal(val, cpu_val)
        np.testing.assert_array_equal(host(be, r_gpu), r_cpu)  # bit for bit


def test_error_feedback_refuses_a_nonfinite_gradient_untouched(be: cuda.Backend) -> None:
    before = rng(8).standard_normal(300).astype(np.float32)
    r = dev(be, before.copy())
    g = np.ones(300, np.float32)
    g[123] = -np.inf
    with pytest.raises(ValueError, match="index 123"):
        cuda.topk_error_feedback(r, dev(be, g), 10, be)
    np.testing.assert_array_equal(host(be, r), before)


@pytest.mark.parametrize(("n", "k"), [(5000, 50), (3000, 1), (4000, 3999), (2048, 300)])
def test_topk_sampled_method_equals_exact(be: cuda.Backend, n: int, k: int) -> None:
    r = rng(n + k)
    x = (r.standard_normal(n) * np.exp(3 * r.standard_normal(n))).astype(np.float32)
    got = [host(be, a) for a in cuda.topk_select(dev(be, x), k, be, method="sampled")]
    np.testing.assert_array_equal(got[0], reference_topk(x, k))
    np.testing.assert_array_equal(got[1], x[got[0]])


def test_topk_sampled_corrects_a_threshold_set_too_high(be: cuda.Backend) -> None:
    # The strided sample sees only the large entries, so its threshold passes too few.
    x = np.full(4096, 0.01, np.float32)
    x[:: max(1, 4096 // 1024)] = 5.0  # every sampled position is large
    x[1::4] = np.linspace(1.0, 2.0, 1024, dtype=np.float32)
    k = 1500
    idx = host(be, cuda.topk_select(dev(be, x), k, be, method="sampled")[0])
    np.testing.assert_array_equal(idx, reference_topk(x, k))


def test_topk_sampled_names_a_nonfinite_index_in_the_input(be: cuda.Backend) -> None:
    x = rng(9).standard_normal(3000).astype(np.float32)
    x[2222] = np.inf
    with pytest.raises(ValueError, match="index 2222"):
        cuda.topk_select(dev(be, x), 10, be, method="sampled")


# --- decompression scatter ------------------------------------------------------------------


def test_scatter_and_scatter_add_match_the_cpu_decoder(be: cuda.Backend) -> None:
    n = 3000
    out_cpu = rng(9).standard_normal(n).astype(np.float32)
    out_gpu = dev(be, out_cpu.copy())
    payloads = []
    for s in range(3):
        g = rng(20 + s).standard_normal(n).astype(np.float32)
        payloads.append(_core.compress_topk(g, 150 + s, method="exact"))
    for p in payloads:
        idx, val, _ = _core.compress_decode(p)
        cuda.scatter(
            out_gpu, dev(be, idx.astype(np.int32)), dev(be, val), scale=0.3, add=True, backend=be
        )
    _core.compress_decompress_sum(payloads, out_cpu, scale=0.3)
    np.testing.assert_allclose(host(be, out_gpu), out_cpu, rtol=1e-6, atol=1e-7)
    # One payload at a time, as the CPU does for decompress_add: bit-identical.
    a, b = dev(be, out_cpu.copy()), out_cpu.copy()
    idx, val, _ = _core.compress_decode(payloads[0])
    cuda.scatter(a, dev(be, idx.astype(np.int32)), dev(be, val), scale=0.7, add=True, backend=be)
    _core.compress_decompress_into(payloads[0], b, add=True, scale=0.7)
    np.testing.assert_array_equal(host(be, a), b)
    dense = dev(be, np.full(n, 5.0, np.float32))
    cuda.scatter(dense, dev(be, idx.astype(np.int32)), dev(be, val), backend=be)
    np.testing.assert_array_equal(host(be, dense), _core.compress_decompress(payloads[0], n))


# --- AdamW ----------------------------------------------------------------------------------


def test_adamw_is_bit_identical_to_the_cpu_step(be: cuda.Backend) -> None:
    n = 1500
    pc = rng(11).standard_normal(n).astype(np.float32)
    mc = np.zeros(n, np.float32)
    vc = np.zeros(n, np.float32)
    p, m, v = dev(be, pc.copy()), dev(be, mc.copy()), dev(be, vc.copy())
    hp = {"lr": 3e-3, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "weight_decay": 0.1}
    for step in range(1, 5):
        g = rng(30 + step).standard_normal(n).astype(np.float32)
        cuda.adamw_step(p, dev(be, g), m, v, step=step, backend=be, **hp)
        _core.adamw_step([pc], [g], [mc], [vc], step=step, **hp)
        np.testing.assert_array_equal(host(be, p), pc)
        np.testing.assert_array_equal(host(be, m), mc)
        np.testing.assert_array_equal(host(be, v), vc)


# --- MoE ------------------------------------------------------------------------------------


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_route_matches_the_cpu(be: cuda.Backend, score: str, with_bias: bool) -> None:
    t, e, k = 300, 12, 3
    logits = rng(12).standard_normal((t, e)).astype(np.float32)
    bias = rng(13).standard_normal(e).astype(np.float32) * 0.1 if with_bias else None
    out = cuda.moe_route(dev(be, logits), k, score, dev(be, bias), backend=be)
    idx, w, probs = (host(be, a) for a in out)
    ci, cw, cp = moe_kernels.route(logits, k, score, bias)  # type: ignore[arg-type]
    np.testing.assert_allclose(probs, cp, rtol=2e-6, atol=1e-7)
    np.testing.assert_array_equal(idx, ci)
    np.testing.assert_allclose(w, cw, rtol=2e-6, atol=1e-7)


def test_route_ties_go_to_the_lower_expert(be: cuda.Backend) -> None:
    logits = np.zeros((5, 8), np.float32)
    logits[:, 5] = 1.0
    idx, w, _ = (host(be, a) for a in cuda.moe_route(dev(be, logits), 3, backend=be))
    np.testing.assert_array_equal(idx, np.tile([5, 0, 1], (5, 1)))
    np.testing.assert_allclose(w.sum(axis=1), 1.0, rtol=1e-6)


@pytest.mark.parametrize("pad_to", [1, 4])
def test_permute_unpermute_and_backwards_match_the_cpu(be: cuda.Backend, pad_to: int) -> None:
    t, k, e, d = 150, 2, 7, 40
    r = rng(14)
    x = r.standard_normal((t, d)).astype(np.float32)
    expert_idx = np.stack([r.permutation(e)[:k] for _ in range(t)]).astype(np.int32)
    expert_idx[:60] = [3, 5]  # a crowded expert: its rows span several order tiles
    weights = r.random((t, k)).astype(np.float32)
    out = cuda.moe_permute(dev(be, x), dev(be, expert_idx), e, pad_to=pad_to, backend=be)
    xs, order, counts = (host(be, a) for a in out)
    cxs, corder, ccounts = moe_kernels.permute(x, expert_idx, e, pad_to=pad_to)
    np.testing.assert_array_equal(counts, ccounts)
    np.testing.assert_array_equal(order, corder)
    np.testing.assert_array_equal(xs, cxs)

    y_sorted = r.standard_normal(xs.shape).astype(np.float32)
    y = host(
        be, cuda.moe_unpermute(dev(be, y_sorted), dev(be, order), dev(be, weights), backend=be)
    )
    np.testing.assert_allclose(
        y, moe_kernels.unpermute(y_sorted, order, weights), rtol=1e-5, atol=1e-6
    )
    dx = host(be, cuda.moe_permute_backward(dev(be, y_sorted), dev(be, order), t, k, backend=be))
    np.testing.assert_allclose(
        dx, moe_kernels.permute_backward(y_sorted, order, t, k), rtol=1e-5, atol=1e-6
    )
    dy = r.standard_normal((t, d)).astype(np.float32)
    out = cuda.moe_unpermute_backward(
        dev(be, dy), dev(be, y_sorted), dev(be, order), dev(be, weights), backend=be
    )
    dys, dw = (host(be, a) for a in out)
    cdys, cdw = moe_kernels.unpermute_backward(dy, y_sorted, order, weights)
    np.testing.assert_array_equal(dys, cdys)  # one product per element: exact
    np.testing.assert_allclose(dw, cdw, rtol=1e-5, atol=1e-5)


def test_permute_refuses_bad_expert_ids(be: cuda.Backend) -> None:
    x = np.zeros((4, 3), np.float32)
    with pytest.raises(ValueError, match="expert_idx"):
        cuda.moe_permute(
            dev(be, x), dev(be, np.array([[0], [1], [9], [2]], np.int32)), 4, backend=be
        )


# --- block-sparse ---------------------------------------------------------------------------


@pytest.mark.parametrize("block", [8, 16])
def test_bsr_forward_dx_and_sddmm_match_the_cpu(be: cuda.Backend, block: int) -> None:
    r = rng(15)
    w = BsrMatrix.random((4 * block, 3 * block), block, density=0.5, seed=3)
    pattern = cuda.BsrDevice(w.shape, w.block, w.indptr, w.indices, backend=be)
    data = dev(be, w.data)
    x = r.standard_normal((9, w.shape[1])).astype(np.float32)
    bias = r.standard_normal(w.shape[0]).astype(np.float32)
    y = host(be, cuda.bsr_linear(dev(be, x), pattern, data, dev(be, bias), backend=be))
    np.testing.assert_allclose(y, bsr_linear(x, w, bias), rtol=1e-5, atol=1e-5)
    dy = r.standard_normal((9, w.shape[0])).astype(np.float32)
    dx = host(be, cuda.bsr_linear_dx(dev(be, dy), pattern, data, backend=be))
    np.testing.assert_allclose(dx, bsr_linear_dx(dy, w), rtol=1e-5, atol=1e-5)
    dw = host(be, cuda.bsr_linear_dw(dev(be, dy), dev(be, x), pattern, backend=be))
    np.testing.assert_allclose(dw, bsr_linear_dw(dy, x, w), rtol=1e-5, atol=1e-5)


# --- fp8 -------------------------------------------------------------------------------------


def test_fp8_quantization_is_bit_identical_to_the_cpu_emulation(be: cuda.Backend) -> None:
    """cuda/fp8.cu against moecore.kernels.fp8 (ml_dtypes' e4m3): the same bytes and scales
    for 1 x 128 tiles and 128 x 128 blocks, partial ones, an all-zero tile, values spanning
    the subnormals to the top of the range; dequantized values equal too."""
    from moecore.kernels import fp8 as cpu
    from moecore.kernels.cuda import fp8

    r = rng(8)
    x = (r.standard_normal((3, 300)) * np.exp(r.uniform(-8, 8, (3, 300)))).astype(np.float32)
    x[2, 256:] = 0
    w = (r.standard_normal((200, 260)) * np.exp(r.uniform(-8, 8, (200, 260)))).astype(np.float32)
    cases = [
        (x, fp8.quantize_tiles, cpu.quantize_activation, cpu.dequantize_activation, False),
        (w, fp8.quantize_blocks, cpu.quantize_weight, cpu.dequantize_weight, True),
    ]
    for a, quantize, quantize_ref, dequantize_ref, blocks in cases:
        q, s = quantize(dev(be, a), backend=be)
        q_ref, s_ref = quantize_ref(a)
        np.testing.assert_array_equal(host(be, q), q_ref.view(np.uint8))
        np.testing.assert_array_equal(host(be, s), s_ref)
        out = host(be, fp8.dequantize(q, s, blocks=blocks, backend=be))
        np.testing.assert_array_equal(out, dequantize_ref(q_ref, s_ref))
    tile_scales = fp8.quantize_tiles(dev(be, w), backend=be)[1]
    with pytest.raises(ValueError, match="scale: expected shape"):
        fp8.dequantize(q, tile_scales, blocks=True, backend=be)


# --- the harness itself ---------------------------------------------------------------------


def test_every_kernel_was_exercised() -> None:
    """Runs last in this file: every kernel declared in cuda/*.cu was launched above through
    the emulation backend, so none goes untested."""
    if not _EMU.launches:
        pytest.skip("no emulated kernel ran in this session (tests deselected)")
    declared = {n for f in sources.families() for n in sources.kernel_names(f)}
    assert declared <= set(_EMU.launches), declared - set(_EMU.launches)


_BROKEN_SCRIPT = textwrap.dedent(
    """
    import numpy as np, _gpu_emu
    from moecore.kernels.cuda import sources
    src = sources.source("topk")
    if {broken}:
        # Drop the barrier between zeroing the shared histogram and filling it.
        src = src.replace("__syncthreads();", "", 1)
    x = np.random.default_rng(0).standard_normal(2000).astype(np.float32)
    hist = np.zeros(2048, np.uint32)
    k = _gpu_emu.Module("topk", "thread", src).get_function("topk_radix_histogram")
    k((2,), (128,), (x, np.int32(x.size), np.uint32(0), np.uint32(0), np.int32(20), hist))
    print("histogram total", int(hist.sum()))
    """
)


@pytest.mark.skipif(SANITIZER != "", reason="spawns its own ThreadSanitizer process")
@pytest.mark.parametrize("broken", [False, True], ids=["intact", "missing-syncthreads"])
def test_thread_sanitizer_catches_a_missing_syncthreads(broken: bool) -> None:
    libtsan = subprocess.run(
        ["g++", "-print-file-name=libtsan.so"], capture_output=True, text=True, check=True
    ).stdout.strip()
    if not os.path.isabs(libtsan):
        pytest.skip("g++ has no ThreadSanitizer runtime (libtsan) installed")
    # The suppressions CI uses: they must not hide a race inside an emulated kernel.
    supp = os.path.join(os.path.dirname(__file__), "gpu_emu", "tsan.supp")
    tsan = f"halt_on_error=1 exitcode=66 suppressions={supp}"
    env = dict(os.environ, LD_PRELOAD=libtsan, TSAN_OPTIONS=tsan)
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(__file__), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-c", _BROKEN_SCRIPT.format(broken=broken)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    if broken:
        assert proc.returncode == 66, proc.stdout + proc.stderr
        assert "ThreadSanitizer: data race" in proc.stderr
        assert "cuda/topk.cu" in proc.stderr  # the #line directive points at the real file
    else:
        assert proc.returncode == 0, proc.stderr
        assert "ThreadSanitizer" not in proc.stderr
        assert "histogram total 2000" in proc.stdout
