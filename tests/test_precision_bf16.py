"""The bf16 Rust kernels (``moecore.kernels.bf16``, ``moecore.kernels.moe_bf16``) against
float64 numpy references.

Inputs are drawn, rounded to bf16, and the reference computes in float64 on exactly those
values. Each kernel accumulates in float32 and rounds its bf16 result once, so the bound is

    |got − ref| ≤ u·|ref| + c·K·2⁻²⁴·Σ|terms|

with u = 2⁻⁸ (bf16's unit roundoff: an 8-bit significand) for a bf16 result (0 for a float32
one), K the reduction length, Σ|terms| the same reduction over absolute values (float32
summation's error bound, γ_K ≈ K·2⁻²⁴), and c a small constant for composed kernels. A bf16
result wrong in its last bit by more than one rounding fails it.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest

from moecore import moe_kernels
from moecore.kernels import moe_bf16 as moe
from moecore.kernels import registry
from moecore.kernels.adamw import RustAdamW
from moecore.kernels.bf16 import BF16, BF16Attention, BF16Norm, matmul
from moecore.kernels.lowp import unit_roundoff

RNG = np.random.default_rng(20261207)
U = unit_roundoff(BF16)  # 2⁻⁸
F32 = 2.0**-24


def bf16(*shape: int, scale: float = 1.0) -> np.ndarray:
    return (scale * RNG.standard_normal(shape)).astype(BF16)


def f64(a: np.ndarray) -> np.ndarray:
    return np.asarray(a).astype(np.float64)


def assert_within(got, ref, abs_terms, k, *, rounded=True, c=2.0, extra=0.0, what=""):
    """``got`` (bf16 when ``rounded``) within one bf16 rounding of ``ref`` plus float32
    summation over ``k`` terms whose absolute values sum to ``abs_terms`` (plus ``extra``,
    an error carried in from a float32 function evaluation)."""
    err = np.abs(f64(got) - ref)
    bound = (U * np.abs(ref) if rounded else 0.0) + c * k * F32 * abs_terms + extra + 1e-30
    if err.size == 0:
        return
    worst = np.unravel_index(np.argmax(err - bound), err.shape)
    assert np.all(err <= bound), f"{what}: {err[worst]} > {bound[worst]} at {worst}"


def test_unit_roundoff_is_that_of_an_8_bit_significand():
    assert U == 2.0**-8
    assert float(ml_dtypes.finfo(BF16).nmant) == 7  # 7 stored bits + the implicit one


# --- the dense GEMM ------------------------------------------------------------------------


@pytest.mark.parametrize("m, k, n", [(1, 1, 1), (130, 700, 33), (257, 64, 300), (5, 0, 4)])
@pytest.mark.parametrize("transpose_b", [False, True])
def test_matmul_against_float64(m, k, n, transpose_b):
    a = bf16(m, k)
    b = bf16(n, k) if transpose_b else bf16(k, n)
    bm = f64(b).T if transpose_b else f64(b)
    got = matmul(a, b, transpose_b)
    assert got.dtype == BF16 and got.shape == (m, n)
    ref = f64(a) @ bm
    assert_within(got, ref, np.abs(f64(a)) @ np.abs(bm), k, what="a @ b")


def test_matmul_rounds_once_to_nearest_even():
    # 1 + 2⁻⁸ + 2⁻¹⁶ lies just above the midpoint of 1 and 1 + 2⁻⁷: one rounding of the float32
    # sum gives 1 + 2⁻⁷; rounding each product to bf16 first would give 1.
    a = np.array([[1.0, 2.0**-8, 2.0**-16]], dtype=BF16)
    b = np.ones((3, 1), dtype=BF16)
    assert float(matmul(a, b)[0, 0]) == 1.0 + 2.0**-7


def test_matmul_refuses_mismatched_or_non_bf16_operands():
    with pytest.raises(ValueError, match="b: expected"):
        matmul(bf16(2, 3), bf16(4, 2))
    with pytest.raises(TypeError, match="bfloat16"):
        matmul(np.ones((2, 2), np.float32), bf16(2, 2))


# --- the MoE kernels -------------------------------------------------------------------------


def _blocks(counts):
    return np.split(np.arange(int(np.sum(counts))), np.cumsum(counts)[:-1])


def _gelu(h):
    return 0.5 * h * (1 + np.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))


def _gelu_grad(h):
    c = math.sqrt(2 / math.pi)
    t = np.tanh(c * (h + 0.044715 * h**3))
    return 0.5 * (1 + t) + 0.5 * h * (1 - t**2) * c * (1 + 3 * 0.044715 * h**2)


COUNTS = np.array([3, 0, 300, 1, 0, 90], np.int32)


def test_grouped_matmul_and_its_gradients_against_float64():
    d_in, d_out, e = 40, 24, len(COUNTS)
    r = int(COUNTS.sum())
    x, w, dy = bf16(r, d_in), bf16(e, d_in, d_out, scale=0.3), bf16(r, d_out)
    y = moe.grouped_matmul(x, COUNTS, w)
    dx = moe.grouped_matmul_dx(dy, COUNTS, w)
    dw = moe.grouped_matmul_dw(x, dy, COUNTS)
    assert (y.dtype, dx.dtype, dw.dtype) == (BF16, BF16, np.float32)
    for ex, rows in enumerate(_blocks(COUNTS)):
        xe, we, dye = f64(x[rows]), f64(w[ex]), f64(dy[rows])
        assert_within(y[rows], xe @ we, np.abs(xe) @ np.abs(we), d_in, what="y")
        assert_within(dx[rows], dye @ we.T, np.abs(dye) @ np.abs(we.T), d_out, what="dx")
        assert_within(
            dw[ex], xe.T @ dye, np.abs(xe.T) @ np.abs(dye), len(rows), rounded=False, what="dw"
        )


def test_gelu_ffn_forward_and_backward_against_float64():
    d_in, hidden, d_out, e = 32, 280, 24, len(COUNTS)
    r = int(COUNTS.sum())
    x, dy = bf16(r, d_in), bf16(r, d_out)
    w1, w2 = bf16(e, d_in, hidden, scale=0.2), bf16(e, hidden, d_out, scale=0.1)
    h, a, y = moe.gelu_ffn(x, COUNTS, w1, w2)
    d_x, d_w1, d_w2 = moe.gelu_ffn_backward(x, COUNTS, w1, w2, h, a, dy)
    assert {h.dtype, a.dtype, y.dtype, d_x.dtype} == {BF16}
    assert d_w1.dtype == d_w2.dtype == np.float32
    for ex, rows in enumerate(_blocks(COUNTS)):
        xe, w1e, w2e, dye = f64(x[rows]), f64(w1[ex]), f64(w2[ex]), f64(dy[rows])
        h_ref = xe @ w1e
        h_abs = np.abs(xe) @ np.abs(w1e)
        assert_within(h[rows], h_ref, h_abs, d_in, what="h")
        # GELU's slope is below 1.13: the float32 error of h passes into a at most that big
        assert_within(a[rows], _gelu(h_ref), 1.13 * h_abs, d_in, what="a")
        a_ref = _gelu(h_ref)
        y_abs = np.abs(a_ref) @ np.abs(w2e) + 1.13 * h_abs @ np.abs(w2e) * d_in / hidden
        assert_within(y[rows], a_ref @ w2e, y_abs, hidden, c=3.0, what="y")
        # backward from the saved bf16 h and a, as the kernel is given them
        hs, as_ = f64(h[rows]), f64(a[rows])
        d_a = dye @ w2e.T
        d_h = d_a * _gelu_grad(hs)
        dh_abs = (np.abs(dye) @ np.abs(w2e.T)) * np.abs(_gelu_grad(hs))
        # GELU' in float32: tanh to ~1 ulp, then 1 − tanh² loses it to cancellation, scaled
        # by up to ~|h|³ terms: an absolute error of at most 8·2⁻²⁴·(1 + |h|³) per element
        dh_eval = (np.abs(dye) @ np.abs(w2e.T)) * 8 * F32 * (1 + np.abs(hs) ** 3)
        assert_within(
            d_w2[ex],
            as_.T @ dye,
            np.abs(as_.T) @ np.abs(dye),
            len(rows),
            rounded=False,
            what="d_w2",
        )
        dx_abs = dh_abs @ np.abs(w1e.T)
        assert_within(
            d_x[rows],
            d_h @ w1e.T,
            dx_abs,
            hidden + d_out,
            c=3.0,
            extra=dh_eval @ np.abs(w1e.T),
            what="d_x",
        )
        assert_within(
            d_w1[ex],
            xe.T @ d_h,
            np.abs(xe.T) @ dh_abs,
            len(rows) + d_out,
            rounded=False,
            c=3.0,
            extra=np.abs(xe.T) @ dh_eval,
            what="d_w1",
        )
    empty = [ex for ex, c in enumerate(COUNTS) if c == 0]
    assert not d_w1[empty].any() and not d_w2[empty].any()


def test_the_moe_family_serves_bf16_arrays_with_these_kernels():
    x = bf16(4, 8)
    assert registry.select_for("moe", x, bf16(3, 8), bf16(3, 8, 5), bf16(3, 5, 8)) is moe
    with pytest.raises(ValueError, match="counts"):
        moe.grouped_matmul(x, np.array([1, 1], np.int32), bf16(2, 8, 3))


def test_the_router_stays_float32_and_the_rows_bf16():
    t, d, e, k = 20, 16, 4, 2
    x, router_w = bf16(t, d), RNG.standard_normal((e, d)).astype(np.float32)
    logits = moe.router_logits(x, router_w)
    assert logits.dtype == np.float32
    np.testing.assert_allclose(logits, f64(x) @ f64(router_w).T, rtol=1e-5, atol=1e-5)
    idx, weights, _ = moe.route(logits, k)
    x_sorted, order, _ = moe.permute(x, idx, e)
    assert x_sorted.dtype == BF16
    # a gather moves bf16 values exactly
    np.testing.assert_array_equal(f64(x_sorted), f64(x)[order // k])
    y = moe.unpermute(x_sorted, order, weights)
    ref = f64(x) * f64(weights).sum(1, keepdims=True)
    assert y.dtype == BF16
    assert_within(y, ref, np.abs(ref), k, what="unpermute")
    d_x = np.zeros((t, d), BF16)
    d_logits = RNG.standard_normal((t, e)).astype(np.float32)
    d_router = moe.router_backward(d_logits, x, router_w, d_x)
    assert d_router.dtype == np.float32 and d_x.dtype == BF16
    assert_within(d_x, f64(d_logits) @ f64(router_w), np.abs(d_logits) @ np.abs(router_w), e)


@pytest.mark.parametrize("capacity", [None, 3])
def test_permute_of_bf16_rows_matches_the_float32_kernel(capacity):
    """The bf16 permute (a gather of the bf16 rows without capacity; the widened float32
    kernel with it) orders rows and counts experts exactly as the float32 kernel does."""
    t, d, e, k = 33, 8, 5, 2
    x = bf16(t, d)
    logits = RNG.standard_normal((t, e)).astype(np.float32)
    idx, weights, _ = moe.route(logits, k)
    got = moe.permute(x, idx, e, capacity, weights if capacity else None)
    ref = moe_kernels.permute(
        f64(x).astype(np.float32), idx, e, capacity, weights if capacity else None
    )
    assert got[0].dtype == BF16
    np.testing.assert_array_equal(got[1], ref[1])
    np.testing.assert_array_equal(got[2], ref[2])
    np.testing.assert_array_equal(f64(got[0]), ref[0].astype(np.float64))
    with pytest.raises(ValueError):
        moe.permute(x, np.full_like(idx, e), e)  # an expert out of range: the kernel's error


# --- norms and attention ---------------------------------------------------------------------


@pytest.mark.parametrize("center", [False, True])
def test_norm_against_float64(center):
    rows, cols, eps = 70, 96, 1e-5
    x = bf16(rows, cols, scale=3.0)
    w = (1 + 0.1 * RNG.standard_normal(cols)).astype(np.float32)
    b = (0.1 * RNG.standard_normal(cols)).astype(np.float32) if center else None
    assert registry.select_for("norm", x, None, None) is BF16Norm
    out, saved = BF16Norm.forward(x, w, b, eps, center)
    assert out.dtype == BF16
    x64 = f64(x)
    mu = x64.mean(-1, keepdims=True) if center else 0.0
    xhat = (x64 - mu) / np.sqrt(((x64 - mu) ** 2).mean(-1, keepdims=True) + eps)
    ref = xhat * w + (0.0 if b is None else b)
    terms = np.abs(xhat * w) + (0.0 if b is None else np.abs(b))
    # the statistics reduce over cols values
    assert_within(out, ref, terms, cols, c=4.0, what="y")
    g = bf16(rows, cols)
    dx, dw, _ = BF16Norm.backward(g, saved, True, True, center)
    assert dx.dtype == BF16 and dw.dtype == np.float32
    g64 = f64(g)
    gw = g64 * w
    a = gw.mean(-1, keepdims=True) if center else 0.0
    rstd = 1 / np.sqrt(((x64 - mu) ** 2).mean(-1, keepdims=True) + eps)
    dx_ref = rstd * (gw - a - xhat * (gw * xhat).mean(-1, keepdims=True))
    dx_terms = rstd * (np.abs(gw) + np.abs(gw).mean(-1, keepdims=True) * (1 + np.abs(xhat) ** 2))
    assert_within(dx, dx_ref, dx_terms, cols, c=4.0, what="dx")
    assert_within(
        dw,
        (g64 * xhat).sum(0),
        (np.abs(g64 * xhat)).sum(0),
        rows,
        rounded=False,
        c=4.0,
        what="dw",
    )


def _attention64(qkv, h, causal):
    b, t, three = qkv.shape
    hd = three // 3 // h
    q, k, v = (f64(qkv).reshape(b, t, 3, h, hd)[:, :, i].transpose(0, 2, 1, 3) for i in range(3))
    s = q @ k.transpose(0, 1, 3, 2) / math.sqrt(hd)
    if causal:
        s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    merge = lambda z: z.transpose(0, 2, 1, 3).reshape(b, t, -1)  # noqa: E731
    return q, k, v, p, merge


@pytest.mark.parametrize("causal", [True, False])
def test_attention_against_float64(causal):
    b, t, h, hd = 2, 33, 3, 16
    qkv = bf16(b, t, 3 * h * hd)
    assert registry.select_for("attention", qkv) is BF16Attention
    out, saved = BF16Attention.forward(qkv, h, causal, None)
    assert out.dtype == BF16 and saved[1].dtype == np.float32
    q, k, v, p, merge = _attention64(qkv, h, causal)
    # the scores reduce over hd products (their float32 error moves p by at most
    # 2·hd·2⁻²⁴ relatively), then P·V over t
    terms = merge(p @ np.abs(v)) * (1 + 2 * hd * np.abs(q).max() * np.abs(k).max())
    assert_within(out, merge(p @ v), terms, t + hd, c=4.0, what="out")
    g = bf16(b, t, h * hd)
    d_qkv = BF16Attention.backward(g, saved, (b, t, h, h * hd), causal, None)
    assert d_qkv.dtype == BF16 and d_qkv.shape == qkv.shape
    g4 = f64(g).reshape(b, t, h, hd).transpose(0, 2, 1, 3)
    dv = p.transpose(0, 1, 3, 2) @ g4
    dp = g4 @ v.transpose(0, 1, 3, 2)
    ds = p * (dp - (dp * p).sum(-1, keepdims=True)) / math.sqrt(hd)
    dq, dk = ds @ k, ds.transpose(0, 1, 3, 2) @ q
    ref = np.stack([dq, dk, dv], axis=2)  # [b, h, 3, t, hd]
    ref = ref.transpose(0, 3, 2, 1, 4).reshape(qkv.shape)
    abs_ds = p * (np.abs(g4) @ np.abs(v).transpose(0, 1, 3, 2)) * 2 / math.sqrt(hd)
    terms = (
        np.stack(
            [
                abs_ds @ np.abs(k),
                abs_ds.transpose(0, 1, 3, 2) @ np.abs(q),
                p.transpose(0, 1, 3, 2) @ np.abs(g4),
            ],
            axis=2,
        )
        .transpose(0, 3, 2, 1, 4)
        .reshape(qkv.shape)
    )
    assert_within(d_qkv, ref, terms, 2 * t + hd, c=4.0, what="d_qkv")


# --- AdamW with the compute copy -------------------------------------------------------------


def test_adamw_writes_the_bf16_compute_copy_in_the_same_pass():
    shapes = [(70000,), (33, 7)]  # one tensor spans several parallel chunks
    params = [RNG.standard_normal(s).astype(np.float32) for s in shapes]
    grads = [RNG.standard_normal(s).astype(np.float32) for s in shapes]
    m = [np.full(s, 0.01, np.float32) for s in shapes]
    v = [np.full(s, 0.02, np.float32) for s in shapes]
    ref = [f64(p) for p in params]
    copies = [np.zeros(s, BF16) for s in shapes]
    hp = dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1, step=3)
    RustAdamW.adamw_step(params, grads, m, v, **hp, compute_copies=copies)
    for p, p64, g, c in zip(params, ref, grads, copies, strict=True):
        g64 = f64(g)
        m64 = 0.9 * 0.01 + 0.1 * g64
        v64 = 0.99 * 0.02 + 0.01 * g64**2
        p64 = p64 * (1 - 1e-3) - 1e-2 * (m64 / (1 - 0.9**3)) / (np.sqrt(v64 / (1 - 0.99**3)) + 1e-8)
        np.testing.assert_allclose(p, p64, rtol=1e-5, atol=1e-6)
        # the copy is the updated float32 master rounded to nearest even, bit for bit
        np.testing.assert_array_equal(c.view(np.uint16), p.astype(BF16).view(np.uint16))
    with pytest.raises(ValueError, match=r"compute_copies\[0\]"):
        RustAdamW.adamw_step(params, grads, m, v, **hp, compute_copies=[params[0], copies[1]])
    with pytest.raises(ValueError, match="compute_copies"):
        RustAdamW.adamw_step(params, grads, m, v, **hp, compute_copies=copies[:1])


@pytest.mark.parametrize("family", ["topk", "bsr"])
def test_a_family_without_a_bf16_kernel_raises_naming_family_device_and_dtype(family):
    with pytest.raises(NotImplementedError) as info:
        registry.select(family, "cpu", BF16)
    msg = str(info.value)
    assert repr(family) in msg and "'cpu'" in msg and "bfloat16" in msg
