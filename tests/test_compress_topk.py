"""moecore.compress.TopK / Int8: the Python face, error feedback, state, inputs, decoding."""

import numpy as np
import pytest

from moecore import _core
from moecore.compress import (
    Context,
    Int8,
    TopK,
    _as_float32,
    decompress,
    decompress_add,
    decompress_sum,
    payload_info,
    warmup_ratios,
)
from moecore.errors import CorruptPayload, NonFiniteGradient


def grads(n, steps, seed=0):
    rng = np.random.default_rng(seed)
    scale = 1.0 + np.arange(n) % 7
    for _ in range(steps):
        yield (rng.standard_normal(n) * scale).astype(np.float32)


def test_usage_from_the_readme():
    g = np.random.default_rng(0).standard_normal((64, 50)).astype(np.float32)
    c = TopK(ratio=0.01, method="sampled", error_feedback=True, values="f16")
    payload, ctx = c.compress(g, name="layer3.w")
    assert payload.dtype == np.uint8 and payload.ndim == 1
    assert ctx.shape == (64, 50) and ctx.k == 32
    dense = c.decompress(payload, ctx)
    assert dense.shape == g.shape and np.count_nonzero(dense) == 32
    top = np.argsort(-np.abs(g), axis=None, kind="stable")[:32]
    np.testing.assert_allclose(dense.flat[top], g.flat[top], rtol=1e-3)
    buf = np.zeros_like(g)
    c.decompress_sum([payload, payload, payload], out=buf, scale=1 / 3)
    np.testing.assert_allclose(buf, dense, rtol=1e-6)
    assert TopK.allreduce_compatible is False and Int8.allreduce_compatible is False


@pytest.mark.parametrize("values", ["f32", "f16", "bf16", "int8"])
@pytest.mark.parametrize("method", ["exact", "sampled"])
def test_error_feedback_conserves_mass_over_100_steps(values, method):
    n = 20_000
    c = TopK(ratio=0.01, method=method, values=values, error_feedback=True)
    sent = np.zeros(n)
    total = np.zeros(n)
    for g in grads(n, 100):
        payload, ctx = c.compress(g, name="w")
        sent += c.decompress(payload, ctx).astype(np.float64)
        total += g.astype(np.float64)
    final = c.residual("w").astype(np.float64)
    # What was sent plus what is left is what came in (float32 rounding of r + g per step).
    tol = 100 * 2.0**-24 * (np.abs(total) + 4 * np.abs(final) + 10)
    assert np.all(np.abs(sent + final - total) <= tol)
    assert np.abs(final).max() > 0  # the residual really carried something


def test_error_feedback_selects_on_gradient_plus_residual():
    c = TopK(ratio=0.4, method="exact", error_feedback=True)
    p1, ctx = c.compress(np.array([5, 1, -2, 0.5, 3], np.float32), name="a")
    np.testing.assert_array_equal(c.decompress(p1, ctx), [5, 0, 0, 0, 3])
    np.testing.assert_array_equal(c.residual("a"), [0, 1, -2, 0.5, 0])
    p2, ctx = c.compress(np.array([0, 1.5, -0.5, 0, 0.1], np.float32), name="a")
    np.testing.assert_array_equal(c.decompress(p2, ctx), [0, 2.5, -2.5, 0, 0])
    np.testing.assert_allclose(c.residual("a"), [0, 0, 0, 0.5, 0.1])


def test_momentum_correction_matches_numpy_reference():
    n, m = 5000, 0.9
    c = TopK(ratio=0.01, method="exact", error_feedback=True, momentum=m)
    u = np.zeros(n, np.float32)
    v = np.zeros(n, np.float32)
    for g in grads(n, 6, seed=3):
        u = (np.float32(m) * u + g).astype(np.float32)
        v = (v + u).astype(np.float32)
        order = np.lexsort((np.arange(n), -np.abs(v)))[:50]
        want = np.zeros(n, np.float32)
        want[order] = v[order]
        u[order] = 0
        v[order] = 0
        payload, ctx = c.compress(g, name="m")
        np.testing.assert_array_equal(c.decompress(payload, ctx), want)
        np.testing.assert_array_equal(c.residual("m"), v)


def test_nan_raises_and_leaves_the_state_as_it_was():
    c = TopK(ratio=0.01, error_feedback=True)
    g = next(grads(100_000, 1))
    c.compress(g, name="w")
    before = c.residual("w").copy()
    bad = g.copy()
    bad[4242] = np.nan
    with pytest.raises(NonFiniteGradient, match=r"non-finite value .* at index 4242"):
        c.compress(bad, name="w")
    # Undone as (r + g) - g: the old residual up to one float32 rounding.
    tol = (np.abs(before) + np.abs(g)) * np.finfo(np.float32).eps
    assert np.all(np.abs(c.residual("w") - before) <= tol)
    m = TopK(ratio=0.01, error_feedback=True, momentum=0.9)
    m.compress(g, name="w")
    v = m.residual("w").copy()
    with pytest.raises(ValueError, match="4242"):
        m.compress(bad, name="w")
    np.testing.assert_array_equal(m.residual("w"), v)  # momentum: checked before updating


@pytest.mark.parametrize("method", ["exact", "sampled"])
def test_pieces_compress_as_their_concatenation(method):
    # A bucket of gradients of assorted shapes (one empty), over several steps: payloads,
    # contexts and residuals equal those of compressing the concatenation.
    shapes = [(300, 5), (0,), (70_000,), (7, 3), (100_000,)]
    rng = np.random.default_rng(4)
    by_pieces = TopK(0.01, method=method, error_feedback=True)
    by_concat = TopK(0.01, method=method, error_feedback=True)
    for step in range(3):
        ps = [rng.standard_normal(s).astype(np.float32) for s in shapes]
        got, got_ctx = by_pieces.compress_pieces(ps, name="bucket")
        want, want_ctx = by_concat.compress(np.concatenate([p.reshape(-1) for p in ps]), "bucket")
        np.testing.assert_array_equal(got, want, err_msg=f"step {step}")
        assert got_ctx == want_ctx
        np.testing.assert_array_equal(by_pieces.residual("bucket"), by_concat.residual("bucket"))
    # Without error feedback the pieces are concatenated: still the same payload.
    p, _ = TopK(0.01, method=method).compress_pieces(ps)
    flat = np.concatenate([q.reshape(-1) for q in ps])
    np.testing.assert_array_equal(p, TopK(0.01, method=method).compress(flat)[0])


def test_a_bad_piece_is_named_and_leaves_the_state_as_it_was():
    c = TopK(0.01, error_feedback=True)
    ok = [np.ones(5000, np.float32), np.full(3000, 2.0, np.float32)]
    c.compress_pieces(ok, name="b")
    before = c.residual("b").copy()
    bad = [ok[0], ok[1].copy()]
    bad[1][17] = np.inf
    with pytest.raises(NonFiniteGradient, match=r"non-finite value .* at index 5017"):
        c.compress_pieces(bad, name="b")
    np.testing.assert_array_equal(c.residual("b"), before)
    with pytest.raises(TypeError, match=r"pieces\[1\]"):
        c.compress_pieces([ok[0], ok[1].astype(np.float64)], name="b")
    with pytest.raises(ValueError, match="shape"):
        c.compress_pieces([ok[0]], name="b")  # 5000 elements, "b" has 8000


def test_warmup_schedule():
    assert warmup_ratios(0.001) == [0.25, 0.0625, 0.015625, 0.00390625, 0.001]
    c = TopK(ratio=0.001, warmup_steps=2, error_feedback=False, method="exact")
    n = 10_000
    ks = []
    for step, g in enumerate(grads(n, 12)):
        assert c.ratio_at(step) == warmup_ratios(0.001)[min(step // 2, 4)]
        payload, ctx = c.compress(g, name="w")
        ks.append(ctx.k)
        assert payload_info(payload)["k"] == ctx.k
    assert ks == [2500, 2500, 625, 625, 156, 156, 39, 39, 10, 10, 10, 10]


@pytest.mark.parametrize("momentum", [None, 0.9])
def test_state_dict_resumes_bit_exactly(momentum):
    stream = list(grads(30_000, 8, seed=5))
    a = TopK(ratio=0.02, error_feedback=True, momentum=momentum, values="f16", warmup_steps=2)
    for g in stream[:4]:
        a.compress(g, name="x")
        a.compress(g[:1000], name="y")
    state = a.state_dict()
    b = TopK(ratio=0.02, error_feedback=True, momentum=momentum, values="f16", warmup_steps=2)
    b.load_state_dict(state)
    for g in stream[4:]:
        pa, _ = a.compress(g, name="x")
        pb, _ = b.compress(g, name="x")
        np.testing.assert_array_equal(pa, pb)
    # the saved state is a copy: later steps did not change it
    assert state["slots"][0]["calls"] == 4
    other = TopK(ratio=0.02, error_feedback=False)
    with pytest.raises(ValueError, match="error_feedback"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="not a TopK state"):
        b.load_state_dict({"kind": "Int8"})


def test_input_checks():
    c = TopK(ratio=0.1)
    with pytest.raises(TypeError, match="dtype float32, got float64"):
        c.compress(np.ones(10))
    with pytest.raises(ValueError, match="C-contiguous"):
        c.compress(np.ones((10, 10), np.float32)[:, ::2])
    with pytest.raises(TypeError, match="numpy float32 array or a CPU object"):
        c.compress([1.0, 2.0])
    for bad in (0, 0.0, 1.5, -0.1, float("nan")):
        with pytest.raises(ValueError, match=r"ratio must be in \(0, 1\]"):
            TopK(ratio=bad)
    with pytest.raises(TypeError, match="ratio"):
        TopK(ratio="0.1")
    with pytest.raises(ValueError, match="method must be one of"):
        TopK(method="fast")
    with pytest.raises(ValueError, match="values must be one of"):
        TopK(values="fp8")
    with pytest.raises(ValueError, match="momentum correction needs error_feedback"):
        TopK(error_feedback=False, momentum=0.9)
    c.compress(np.ones(10, np.float32), name="w")
    with pytest.raises(ValueError, match=r"'w' was compressed with shape \(10,\), now \(11,\)"):
        c.compress(np.ones(11, np.float32), name="w")
    c.reset("w")
    c.compress(np.ones(11, np.float32), name="w")


def test_dlpack_exporters_are_used_without_copy():
    class Exporter:  # a minimal CPU DLPack producer (what a PyTorch CPU tensor looks like)
        def __init__(self, a):
            self.a = a

        def __dlpack__(self, **kwargs):
            return self.a.__dlpack__(**kwargs)

        def __dlpack_device__(self):
            return self.a.__dlpack_device__()

    g = next(grads(50_000, 1))
    view = _as_float32(Exporter(g), "grad")
    assert np.shares_memory(view, g)
    a, _ = TopK(0.01, error_feedback=False).compress(Exporter(g))
    b, _ = TopK(0.01, error_feedback=False).compress(g)
    np.testing.assert_array_equal(a, b)


def test_cupy_arrays_without_a_gpu_path_name_the_operation():
    fake = type("ndarray", (), {"__module__": "cupy._core.core", "__dlpack__": lambda s: None})
    with pytest.raises(NotImplementedError, match="values='f32' without momentum"):
        TopK(momentum=0.9).compress(fake())
    with pytest.raises(NotImplementedError, match="values='f32' without momentum"):
        TopK(values="f16").compress(fake())
    with pytest.raises(NotImplementedError, match="no GPU path"):
        Int8().compress(fake())


def test_torch_cpu_tensor_if_installed():
    torch = pytest.importorskip("torch")
    t = torch.randn(10_000)
    p, ctx = TopK(0.01, error_feedback=False, method="exact").compress(t)
    ref = t.numpy()
    idx = np.lexsort((np.arange(ref.size), -np.abs(ref)))[:100]
    np.testing.assert_array_equal(np.flatnonzero(decompress(p, ctx)), np.sort(idx))


def test_decompress_variants_and_their_checks():
    g = next(grads(10_000, 1))
    c = TopK(0.05, error_feedback=False)
    p, ctx = c.compress(g.reshape(100, 100))
    dense = decompress(p, ctx)
    assert dense.shape == (100, 100)
    flat = decompress(p)
    np.testing.assert_array_equal(flat, dense.reshape(-1))
    np.testing.assert_array_equal(decompress(bytes(p)), flat)  # bytes work too
    out = np.full((100, 100), 9.0, np.float32)
    assert decompress(p, ctx, out=out) is out
    np.testing.assert_array_equal(out, dense)
    decompress_add(p, out, 2.0)
    np.testing.assert_allclose(out, 3 * dense)
    acc = np.ones(10_000, np.float32)
    ps = [c.compress(x)[0] for x in grads(10_000, 5, seed=9)]
    decompress_sum(ps, acc, 0.5)
    want = 1 + 0.5 * sum(decompress(q).astype(np.float64) for q in ps)
    np.testing.assert_allclose(acc, want, rtol=1e-6)
    over = np.full(10_000, np.nan, np.float32)
    assert decompress_sum(ps, over, 0.5, overwrite=True) is over
    np.testing.assert_allclose(over, want - 1, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="out has 10 elements, ctx describes 10000"):
        decompress(p, ctx, out=np.zeros(10, np.float32))
    with pytest.raises(CorruptPayload, match="payload is for n = 10000 elements, the output has 9"):
        decompress_add(p, np.zeros(9, np.float32))
    with pytest.raises(CorruptPayload, match="payload 1: checksum mismatch"):
        bad = p.copy()
        bad[50] ^= 4
        decompress_sum([p, bad], np.zeros(10_000, np.float32))
    kept = np.full(10_000, 3.0, np.float32)
    with pytest.raises(CorruptPayload, match="payload 1: checksum mismatch"):
        decompress_sum([p, bad], kept, overwrite=True)
    assert (kept == 3.0).all(), "a refused overwrite must leave out as it was"
    with pytest.raises(ValueError, match="read-only"):
        ro = np.zeros(10_000, np.float32)
        ro.flags.writeable = False
        decompress_add(p, ro)
    with pytest.raises(TypeError, match="uint8"):
        decompress(p.astype(np.int16))


def test_lying_header_cannot_make_decompress_allocate():
    # A valid 44-byte payload that claims 2^32 - 1 elements.
    p = _core.compress_encode(
        2**32 - 1, np.zeros(0, np.uint32), np.zeros(0, np.float32), index="varint"
    )
    assert p.size == 44
    with pytest.raises(CorruptPayload, match="more than max_elements"):
        decompress(p)
    with pytest.raises(CorruptPayload, match="payload is for n = 4294967295"):
        decompress(p, Context(shape=(10,), name=None, k=0))


@pytest.mark.parametrize("stochastic", [False, True])
def test_int8_dense_quantizer(stochastic):
    g = next(grads(100_003, 1))
    q = Int8(chunk=128, stochastic=stochastic, seed=1)
    p, ctx = q.compress(g, name="w")
    assert p.size == 44 + g.size + 4 * -(-g.size // 128)
    info = payload_info(p)
    assert (info["index"], info["values"], info["k"]) == ("dense", "int8", g.size)
    d = q.decompress(p, ctx)
    chunks = np.pad(np.abs(g), (0, -g.size % 128)).reshape(-1, 128).max(axis=1)
    step = np.repeat(chunks / 127, 128)[: g.size]
    bound = (1.0 if stochastic else 0.5) * step * 1.0001
    assert np.all(np.abs(d - g) <= bound)
    if stochastic:
        # unbiased: the mean error over many elements is far below one step
        assert abs(float(np.mean(d.astype(np.float64) - g))) < 0.01 * step.mean()
        p2, _ = q.compress(g, name="w")
        assert not np.array_equal(p, p2)  # a new draw each call
        fresh = Int8(chunk=128, stochastic=True, seed=1)
        fresh.load_state_dict(Int8(chunk=128, stochastic=True, seed=1).state_dict())
        np.testing.assert_array_equal(fresh.compress(g, name="w")[0], p)
    with pytest.raises(ValueError, match="non-finite"):
        q.compress(np.array([1, np.inf], np.float32))


def test_edge_shapes_round_trip():
    c = TopK(0.5, error_feedback=True)
    for x in (
        np.zeros(0, np.float32),
        np.array(3.0, np.float32),
        np.array([-2.0], np.float32),
        np.arange(10, dtype=np.float32).reshape(2, 5),
    ):
        p, ctx = c.compress(x, name=str(x.shape))
        assert ctx.shape == x.shape and ctx.k == (0 if x.size == 0 else max(1, round(x.size / 2)))
        d = c.decompress(p, ctx)
        assert d.shape == x.shape
        top = np.argsort(-np.abs(x), axis=None, kind="stable")[: ctx.k]
        np.testing.assert_array_equal(d.flat[top], x.flat[top])
    out = np.ones(3, np.float32)
    np.testing.assert_array_equal(decompress_sum([], out), np.ones(3))
    p, ctx = Int8().compress(np.zeros(0, np.float32))
    assert Int8().decompress(p, ctx).size == 0


def test_k_next_and_skip_keep_a_dropped_call_in_step_with_the_warm_up():
    """``k_next`` is the k the next call sends; ``skip`` counts a call that sent nothing (a
    rank whose gradient was dropped) so its warm-up stage matches ranks that compressed."""
    n = 10_000
    g = next(grads(n, 3))
    skipping = TopK(0.01, warmup_steps=2, error_feedback=True)
    compressing = TopK(0.01, warmup_steps=2, error_feedback=True)
    assert skipping.k_next(n, "b") == TopK.k_for(n, 0.25)  # before any call: stage 0
    for call in range(8):
        want = compressing.k_next(n, "b")
        _, ctx = compressing.compress(g, name="b")
        assert ctx.k == want == TopK.k_for(n, compressing.ratio_at(call))
        assert skipping.k_next(n, "b") == want
        if call == 3:
            before = skipping.residual("b").copy()
            skipping.skip(n, "b")
            np.testing.assert_array_equal(skipping.residual("b"), before)
        else:
            skipping.compress(g, name="b")
    assert skipping.k_next(n, "b") == compressing.k_next(n, "b") == TopK.k_for(n, 0.01)


def test_k_next_and_skip_refuse_a_bad_length_or_a_changed_shape():
    c = TopK(0.01, error_feedback=True)
    with pytest.raises(ValueError, match=r"n must be in \[0, "):
        c.k_next(-1, "b")
    with pytest.raises(TypeError, match="n must be an int, got float"):
        c.skip(10.0, "b")
    c.compress(np.ones(100, np.float32), name="b")
    with pytest.raises(
        ValueError, match=r"tensor 'b' was compressed with shape \(100,\), now \(50,\)"
    ):
        c.skip(50, "b")
