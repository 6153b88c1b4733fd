"""Low-precision formats, the fp8 GEMM, the float32 doorway, the loss scaler and the master
weights, each against an independent reference: bit arithmetic for rounding, float64 numpy
for the kernels (tolerances derived from each format's unit roundoff), a hand-computed
trace for the loss scaler."""

import math

import ml_dtypes
import numpy as np
import pytest

import moecore
from moecore.errors import NonFiniteInput
from moecore.kernels import fp8, registry
from moecore.kernels.lowp import round_to, unit_roundoff
from moecore.nn.precision import RoundTo
from moecore.optim import SGD, LossScaler, MasterWeights

BF16 = np.dtype(ml_dtypes.bfloat16)
RNG = np.random.default_rng(26)


def bf16_by_bits(x):
    """float32 → bf16 → float32 by integer arithmetic: round to nearest, ties to even, on
    the upper 16 bits (finite inputs)."""
    bits = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    lsb = (bits >> 16) & 1
    rounded = ((bits + 0x7FFF + lsb) >> 16) << 16
    return rounded.astype(np.uint32).view(np.float32)


# --- formats ---------------------------------------------------------------------------------


def test_bf16_rounding_is_round_to_nearest_even_on_the_upper_bits():
    x = (RNG.standard_normal(10_000) * np.exp(RNG.uniform(-20, 20, 10_000))).astype(np.float32)
    ties = np.array([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8)], np.float32)  # exactly halfway
    x = np.concatenate([x, ties])
    np.testing.assert_array_equal(round_to(x, BF16), bf16_by_bits(x))
    assert list(round_to(ties, BF16)) == [1.0, 1 + 2**-6, -1.0]
    assert unit_roundoff(BF16) == 2**-8 and unit_roundoff(np.float16) == 2**-11


def test_fp16_overflows_to_inf_and_e4m3_saturates():
    big = np.array([70000.0, -1e6, 1000.0], np.float32)
    assert list(round_to(big, np.float16)) == [np.inf, -np.inf, 1000.0]
    assert list(round_to(big, ml_dtypes.float8_e4m3fn)) == [448.0, -448.0, 448.0]
    assert round_to(np.array([2.0**-25], np.float32), np.float16)[0] == 0.0  # underflow


# --- fp8 -------------------------------------------------------------------------------------

E4M3_U = 2.0**-4  # e4m3: 3 mantissa bits
E4M3_SUB = 2.0**-9  # smallest subnormal


def _quantization_bound(x, scale_per_element):
    """|q·s − x| ≤ u·|x| for normals, half a subnormal step (times the scale) below them."""
    return E4M3_U * np.abs(x) + scale_per_element * E4M3_SUB / 2


def test_activation_tiles_are_1x128_with_amax_over_448_scales():
    x = RNG.standard_normal((3, 300)).astype(np.float32)
    x[1, 128:256] *= 1000  # one tile much larger than its neighbours
    x[2, 256:] = 0  # an all-zero (partial) tile
    q, s = fp8.quantize_activation(x)
    assert q.dtype == fp8.E4M3 and s.shape == (3, 3)
    for r in range(3):
        for t, cols in enumerate([slice(0, 128), slice(128, 256), slice(256, 300)]):
            amax = np.abs(x[r, cols].astype(np.float64)).max()
            assert s[r, t] == pytest.approx(amax / 448 if amax else 1.0, rel=1e-7)
    deq = fp8.dequantize_activation(q, s)
    scale_el = np.repeat(s, 128, axis=1)[:, :300]
    assert np.all(np.abs(deq - x) <= _quantization_bound(x, scale_el) * (1 + 1e-6))
    assert np.abs(q.astype(np.float32)).max() == 448.0  # each tile's amax maps onto e4m3's max


def test_weight_blocks_are_128x128():
    w = RNG.standard_normal((200, 260)).astype(np.float32)
    w[130:, :128] *= 50
    q, s = fp8.quantize_weight(w)
    assert s.shape == (2, 3)
    for bi, rows in enumerate([slice(0, 128), slice(128, 200)]):
        for bj, cols in enumerate([slice(0, 128), slice(128, 256), slice(256, 260)]):
            assert s[bi, bj] == pytest.approx(np.abs(w[rows, cols]).max() / 448, rel=1e-7)
    scale_el = np.repeat(np.repeat(s, 128, 0), 128, 1)[:200, :260]
    deq = fp8.dequantize_weight(q, s)
    assert np.all(np.abs(deq - w) <= _quantization_bound(w, scale_el) * (1 + 1e-6))


def test_fp8_gemm_against_float64():
    m, n, k = 7, 130, 515  # partial tiles and blocks on every edge
    x = RNG.standard_normal((m, k)).astype(np.float32)
    w = (RNG.standard_normal((n, k)) * 0.05).astype(np.float32)
    xq, xs = fp8.quantize_activation(x)
    wq, ws = fp8.quantize_weight(w)
    y = fp8.fp8_gemm(xq, xs, wq, ws)
    # 1. Against the float64 product of the dequantized operands: only float32 sums differ,
    #    128 products per chunk then one promotion per chunk.
    a = fp8.dequantize_activation(xq, xs).astype(np.float64)
    b = fp8.dequantize_weight(wq, ws).astype(np.float64)
    ref = a @ b.T
    gamma = (128 + math.ceil(k / 128) + 2) * 2.0**-24
    assert np.all(np.abs(y - ref) <= gamma * (np.abs(a) @ np.abs(b).T))
    # 2. Against the float64 product of the original operands: each operand within the
    #    quantization bound, so each product within (2u + u²)·|x||w| plus subnormal terms.
    exact = x.astype(np.float64) @ w.astype(np.float64).T
    ex = _quantization_bound(x, np.repeat(xs, 128, 1)[:, :k])
    ew = _quantization_bound(w, np.repeat(np.repeat(ws, 128, 0), 128, 1)[:n, :k])
    bound = (np.abs(x) + ex) @ ew.T + ex @ np.abs(w).T
    assert np.all(np.abs(y - exact) <= bound + gamma * (np.abs(a) @ np.abs(b).T))
    # and the fine-grained scales matter: the error is small relative to the product
    assert np.linalg.norm(y - exact) < 0.1 * np.linalg.norm(exact)


def test_fp8_gemm_refuses_wrong_operands():
    xq, xs = fp8.quantize_activation(np.ones((2, 128), np.float32))
    wq, ws = fp8.quantize_weight(np.ones((4, 64), np.float32))
    with pytest.raises(ValueError, match="K = 128"):
        fp8.fp8_gemm(xq, xs, wq, ws)
    with pytest.raises(TypeError, match="float8_e4m3fn"):
        fp8.fp8_gemm(xq.astype(np.float32), xs, xq, xs)
    with pytest.raises(NonFiniteInput, match="non-finite"):
        fp8.quantize_activation(np.array([[np.inf, 1.0]], np.float32))
    # training's quantize-dequantize passes a non-finite tensor through, for the trainer's
    # skip-and-count of non-finite steps to see it
    bad = np.array([[np.nan, 1.0], [2.0, 3.0]], np.float32)
    np.testing.assert_array_equal(fp8.fake_quantize_activation(bad), bad)
    np.testing.assert_array_equal(fp8.fake_quantize_weight(bad), bad)
    with pytest.raises(ValueError, match="2-D"):
        fp8.quantize_weight(np.ones(3, np.float32))


# --- the float32 doorway ---------------------------------------------------------------------


def _layer_norm64(x, w, b, eps):
    x = x.astype(np.float64)
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


@pytest.mark.parametrize("dtype", [BF16, np.dtype(np.float16)])
def test_norm_in_a_low_format_against_float64(dtype):
    x = RNG.standard_normal((6, 96)).astype(dtype)
    w = (1 + 0.1 * RNG.standard_normal(96)).astype(dtype)
    b = (0.1 * RNG.standard_normal(96)).astype(dtype)
    impl = registry.select_for("norm", x, w, b)
    # the bf16 Rust kernel or the fp16 doorway, not the array-module fallback
    assert impl.__name__ == ("BF16Norm" if dtype == BF16 else "DoorwayNorm")
    out, saved = impl.forward(x, w, b, 1e-5, True)
    assert out.dtype == dtype
    ref = _layer_norm64(x, w.astype(np.float64), b.astype(np.float64), 1e-5)
    u = unit_roundoff(dtype)
    # one rounding of the float32 result (u·|ref|) plus float32 arithmetic (≪ u)
    assert np.all(np.abs(out.astype(np.float64) - ref) <= u * np.abs(ref) + 1e-5)
    # saved statistics stay float32 (the saved input is float32 behind the doorway, bf16 in
    # the bf16 kernel); backward returns dx in the format, dw/db float32
    arrays = [s for s in saved if isinstance(s, np.ndarray)]
    assert arrays[0].dtype == (BF16 if dtype == BF16 else np.float32)
    assert all(s.dtype == np.float32 for s in arrays[1:])
    g = RNG.standard_normal(x.shape).astype(dtype)
    dx, dw, db = impl.backward(g, saved, True, True, True)
    assert dx.dtype == dtype and dw.dtype == np.float32 and db.dtype == np.float32
    np.testing.assert_allclose(db, g.astype(np.float64).sum(0), rtol=1e-5, atol=1e-5)


def test_attention_in_bf16_against_float64():
    b, t, h, hd = 2, 9, 2, 16
    qkv = RNG.standard_normal((b, t, 3 * h * hd)).astype(BF16)
    impl = registry.select_for("attention", qkv)
    out, _ = impl.forward(qkv, h, True, None)
    assert out.dtype == BF16
    q, k, v = np.split(qkv.astype(np.float64).reshape(b, t, 3, h, hd), 3, axis=2)
    q, k, v = (a[:, :, 0].transpose(0, 2, 1, 3) for a in (q, k, v))
    s = q @ k.transpose(0, 1, 3, 2) / math.sqrt(hd)
    s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    ref = (p @ v).transpose(0, 2, 1, 3).reshape(b, t, h * hd)
    assert np.all(np.abs(out.astype(np.float64) - ref) <= 2**-8 * np.abs(ref) + 1e-5)


@pytest.mark.parametrize(
    "family, dtype", [("topk", BF16), ("moe", np.float16), ("adamw", np.float16), ("bsr", BF16)]
)
def test_a_family_without_a_low_precision_kernel_names_family_device_and_dtype(family, dtype):
    with pytest.raises(NotImplementedError) as info:
        registry.select(family, "cpu", dtype)
    msg = str(info.value)
    assert repr(family) in msg and "'cpu'" in msg and np.dtype(dtype).name in msg


# --- rounding in autograd --------------------------------------------------------------------


def test_round_to_rounds_the_value_and_the_gradient():
    x = moecore.Tensor(np.array([1.0 + 2**-10, 3.0], np.float32), requires_grad=True)
    y = RoundTo.apply(x, np.dtype(np.float16))
    assert list(y.data) == [1.0 + 2**-10, 3.0]  # both representable in fp16 (11 bits)
    (y * moecore.Tensor(np.array([1e5, 2.0**-26], np.float32))).sum().backward()
    # 1e5 overflows fp16 (max 65504); 2⁻²⁶ underflows to zero: what loss scaling is for
    assert x.grad[0] == np.inf and x.grad[1] == 0.0


# --- loss scaler -----------------------------------------------------------------------------


def test_loss_scaler_follows_a_hand_computed_trace_with_overflow():
    scaler = LossScaler(init_scale=8.0, growth_factor=2.0, backoff_factor=0.5, growth_interval=3)
    # (found_inf, scale after update, growth tracker after update), worked out by hand from
    # GradScaler's rule: inf → scale·0.5, tracker 0; else tracker+1, at 3 → scale·2, tracker 0
    trace = [
        (False, 8.0, 1),
        (False, 8.0, 2),
        (False, 16.0, 0),
        (False, 16.0, 1),
        (True, 8.0, 0),
        (True, 4.0, 0),
        (False, 4.0, 1),
        (False, 4.0, 2),
        (False, 8.0, 0),
    ]
    for found_inf, scale, tracker in trace:
        scaler.update(found_inf)
        assert (scaler.scale, scaler.growth_tracker) == (scale, tracker)
    restored = LossScaler()
    restored.load_state_dict(scaler.state_dict())
    assert (restored.scale, restored.growth_tracker) == (8.0, 0)


def test_unscale_divides_the_gradients_and_finds_inf_and_nan():
    scaler = LossScaler(init_scale=1024.0)
    a = moecore.Tensor(np.zeros(3, np.float32), requires_grad=True)
    b = moecore.Tensor(np.zeros(2, np.float32), requires_grad=True)
    a.grad = np.array([1024.0, 2048.0, -512.0], np.float32)
    b.grad = np.array([3.0, 5.0], np.float32)
    assert scaler.unscale_([a, b]) is False
    np.testing.assert_array_equal(a.grad, [1.0, 2.0, -0.5])
    np.testing.assert_array_equal(b.grad, np.float32([3.0, 5.0]) * np.float32(1 / 1024))
    b.grad = np.array([np.nan, 1.0], np.float32)
    assert scaler.unscale_([a, b]) is True
    a.grad = np.array([np.inf], np.float32)
    b.grad = None
    assert scaler.unscale_([a, b]) is True


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"init_scale": 0.0}, "init_scale"),
        ({"growth_factor": 1.0}, "growth_factor"),
        ({"backoff_factor": 1.0}, "backoff_factor"),
        ({"growth_interval": 0}, "growth_interval"),
    ],
)
def test_loss_scaler_refuses_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LossScaler(**kwargs)


# --- master weights --------------------------------------------------------------------------


def test_master_weights_keep_updates_below_the_formats_resolution():
    # bf16 has 8 significant bits: 1 + 2⁻¹⁰ is 1 in bf16. Ten SGD steps of 2⁻¹⁰ each
    # change a bf16 weight not at all; the float32 master moves by 10·2⁻¹⁰.
    p = moecore.Tensor(np.ones(4, np.float32), requires_grad=True)
    masters = MasterWeights([p], BF16)
    opt = SGD([p], lr=2.0**-10)
    master = p.data
    for _ in range(10):
        with masters.compute_copies():
            assert p.data is not master and p.data.dtype == np.float32
            np.testing.assert_array_equal(p.data, bf16_by_bits(master))
            (p * moecore.Tensor(np.full(4, -1.0, np.float32))).sum().backward()
        assert p.data is master
        opt.step()
        opt.zero_grad()
    np.testing.assert_allclose(p.data, 1 + 10 * 2.0**-10, rtol=1e-7)
    with masters.compute_copies():
        np.testing.assert_array_equal(p.data, bf16_by_bits(p.data))  # 1.0078125 in bf16
    assert MasterWeights([p], np.float32).copy_fn(p) is None  # float32: no copies
