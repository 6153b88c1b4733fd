"""The tape: accumulation, hooks, graph freeing, shape checks, no_grad, tensors' basics."""

import numpy as np
import pytest

import moecore as mc
from moecore.autograd import Function, gradcheck


def t64(*shape, seed=0, grad=True):
    return mc.Tensor(np.random.default_rng(seed).standard_normal(shape), requires_grad=grad)


def test_gradient_accumulates_over_reuse_and_backward_calls():
    x = mc.tensor([1.0, 2.0, 3.0], requires_grad=True)
    (x * x + x).sum().backward()
    np.testing.assert_allclose(x.grad, 2 * x.data + 1)
    (x * 3.0).sum().backward()
    np.testing.assert_allclose(x.grad, 2 * x.data + 1 + 3)


def test_leaf_grads_never_alias_each_other():
    a = mc.tensor([1.0, 2.0], requires_grad=True)
    b = mc.tensor([3.0, 4.0], requires_grad=True)
    (a + b).sum().backward()
    a.grad *= 10  # in-place edits of one gradient (clipping does this) must not leak
    np.testing.assert_allclose(b.grad, [1.0, 1.0])


def test_fresh_kernel_results_become_grads_without_a_copy_and_views_are_copied():
    """Arrays the Rust kernels return own fresh memory through a non-array base object
    (rust-numpy's PySliceContainer): the engine hands them to .grad as they are. A view of
    another array must still be copied, so .grad never aliases what a Function kept."""
    kept = {}

    class Fresh(Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2.0

        @staticmethod
        def backward(ctx, g):
            fresh = np.frombuffer(bytearray(g.astype(np.float32).tobytes()), np.float32)
            assert fresh.base is not None and fresh.flags.writeable
            kept["fresh"] = fresh
            return fresh.reshape(g.shape) if fresh.shape != g.shape else fresh

    class View(Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2.0

        @staticmethod
        def backward(ctx, g):
            kept["whole"] = np.concatenate([g, g]).astype(np.float32)
            return kept["whole"][: g.shape[0]]

    a = mc.tensor(np.ones(4, np.float32), requires_grad=True)
    Fresh.apply(a).backward(np.arange(4, dtype=np.float32))
    assert a.grad is kept["fresh"]
    b = mc.tensor(np.ones(4, np.float32), requires_grad=True)
    View.apply(b).backward(np.arange(4, dtype=np.float32))
    assert not np.shares_memory(b.grad, kept["whole"])
    np.testing.assert_array_equal(b.grad, np.arange(4))
    a_rust = mc.Tensor(np.ones((8, 4), np.float32), requires_grad=True)
    router = mc.Tensor(np.ones((2, 4), np.float32), requires_grad=True)
    w1 = mc.Tensor(np.ones((2, 4, 6), np.float32), requires_grad=True)
    w2 = mc.Tensor(np.ones((2, 6, 4), np.float32), requires_grad=True)
    mc.ops.moe(a_rust, router, w1, w2, k=1).sum().backward()
    assert type(w1.grad.base).__name__ == "PySliceContainer"  # the kernel's own array


def test_graph_is_freed_after_backward_and_second_backward_raises():
    x = t64(3)
    y = (x.exp() * 2.0).sum()
    y.backward()
    with pytest.raises(RuntimeError, match="second time"):
        y.backward()
    z = (x.exp() * 2.0).sum()
    x.grad = None
    z.backward(retain_graph=True)
    first = x.grad.copy()
    z.backward()
    np.testing.assert_allclose(x.grad, 2 * first)


def test_leaf_hooks_fire_once_when_their_gradient_is_complete():
    w1, w2 = t64(3, 3, seed=1), t64(3, 3, seed=2)
    order = []
    w1.register_post_accumulate_grad_hook(lambda p: order.append(("w1", p.grad.copy())))
    w2.register_post_accumulate_grad_hook(lambda p: order.append(("w2", p.grad.copy())))
    x = t64(2, 3, seed=3, grad=False)
    h = x @ w1
    out = ((h @ w2) + (h @ w2)).sum()  # w2 used twice, both uses before w1 in backward
    out.backward()
    assert [name for name, _ in order] == ["w2", "w1"]  # the layer nearest the output first
    np.testing.assert_allclose(order[0][1], w2.grad)
    np.testing.assert_allclose(order[1][1], w1.grad)


def test_tensor_hook_can_replace_the_gradient():
    x = mc.tensor([1.0, 2.0], requires_grad=True)
    y = x * 2.0
    y.register_hook(lambda g: g * 0 + 5.0)
    y.sum().backward()
    np.testing.assert_allclose(x.grad, [10.0, 10.0])


def test_backward_checks_the_shapes_functions_return():
    class Broken(Function):
        @staticmethod
        def forward(ctx, a):
            return a * 2

        @staticmethod
        def backward(ctx, g):
            return g[:1]

    x = t64(3)
    with pytest.raises(RuntimeError, match=r"Broken\.backward returned a gradient of shape"):
        Broken.apply(x).sum().backward()


def test_no_grad_records_nothing_and_detach_cuts():
    x = t64(2)
    with mc.no_grad():
        y = x * 2.0
    assert not y.requires_grad and y.is_leaf
    z = (x.detach() * 2.0 + x).sum()
    z.backward()
    np.testing.assert_allclose(x.grad, [1.0, 1.0])


def test_backward_needs_scalar_or_explicit_grad():
    x = t64(3)
    with pytest.raises(RuntimeError, match="one-element"):
        (x * 2.0).backward()
    (x * 2.0).backward(np.ones(3))
    np.testing.assert_allclose(x.grad, [2.0, 2.0, 2.0])
    with pytest.raises(RuntimeError, match="does not require grad"):
        mc.tensor([1.0]).backward()


def test_tensor_construction_and_dtypes():
    assert mc.tensor([1.0, 2.0]).dtype == np.float32
    assert mc.tensor([1, 2]).dtype.kind == "i"
    assert mc.tensor(np.zeros(2, np.float64)).dtype == np.float64
    src = np.zeros(3, np.float32)
    assert mc.tensor(src).data is not src  # tensor() copies
    assert mc.Tensor(src).data is src  # Tensor() wraps
    assert mc.zeros(2, 3).shape == (2, 3) and mc.ones((4,)).numpy().sum() == 4
    assert mc.arange(5).tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(TypeError, match="floating-point"):
        mc.tensor([1, 2], requires_grad=True)
    assert mc.tensor([[3.5]]).item() == 3.5


def test_manual_seed_makes_randn_reproducible():
    mc.manual_seed(7)
    a = mc.randn(4).numpy().copy()
    mc.manual_seed(7)
    np.testing.assert_array_equal(a, mc.randn(4).numpy())
    state = mc.get_rng_state()
    b = mc.randn(3).numpy().copy()
    mc.set_rng_state(state)
    np.testing.assert_array_equal(b, mc.randn(3).numpy())


def test_dlpack_round_trip_shares_memory():
    x = mc.tensor([1.0, 2.0, 3.0])
    y = mc.from_dlpack(x)
    y.data[0] = 42.0
    assert x.data[0] == 42.0
    z = np.from_dlpack(x)
    assert np.shares_memory(z, x.data)


def test_gradcheck_catches_a_wrong_gradient():
    class WrongSquare(Function):
        @staticmethod
        def forward(ctx, a):
            ctx.save_for_backward(a)
            return a * a

        @staticmethod
        def backward(ctx, g):
            (a,) = ctx.saved_tensors
            return g * a  # should be 2·a·g

    with pytest.raises(AssertionError, match="gradcheck failed"):
        gradcheck(WrongSquare.apply, [t64(4)])
    with pytest.raises(ValueError, match="float64"):
        gradcheck(lambda a: a * 2.0, [mc.tensor([1.0], requires_grad=True)])
