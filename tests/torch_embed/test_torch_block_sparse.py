"""BlockSparseLinear against a dense torch linear with the same (masked) weight: forward, the
input gradient, the kept blocks' gradient, the bias gradient, and optimizer steps."""

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the torch integration tests need PyTorch")

from moecore.integrations.torch import BlockSparseLinear  # noqa: E402


def _blocks_of(dense_grad, layer):
    """The gradient of the kept blocks, read out of a dense ``[out, in]`` gradient."""
    b, m = layer.block, layer.matrix
    rows = np.repeat(np.arange(len(m.indptr) - 1), np.diff(m.indptr))
    return torch.stack(
        [dense_grad[r * b : (r + 1) * b, c * b : (c + 1) * b] for r, c in zip(rows, m.indices)]
    )


@pytest.mark.parametrize("block", [8, 16])
def test_forward_and_gradients_equal_a_dense_linear(block):
    torch.manual_seed(0)
    layer = BlockSparseLinear(64, 48, block=block, density=0.4, seed=1)
    with torch.no_grad():
        layer.bias.normal_()
    weight = layer.to_dense().requires_grad_()
    bias = layer.bias.detach().clone().requires_grad_()
    x = torch.randn(2, 5, 64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    g = torch.randn(2, 5, 48)

    (layer(x) * g).sum().backward()
    y_ref = torch.nn.functional.linear(x_ref, weight, bias)
    (y_ref * g).sum().backward()

    torch.testing.assert_close(layer(x), y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.bias.grad, bias.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        layer.values.grad, _blocks_of(weight.grad, layer), rtol=1e-5, atol=1e-5
    )


def test_optimizer_steps_reach_the_kernels_and_match_dense_training():
    torch.manual_seed(0)
    mask = torch.rand(4, 8) < 0.5
    dense_w = torch.randn(32, 64) * 0.1
    layer = BlockSparseLinear.from_dense(dense_w, block=8, mask=mask.numpy(), bias=torch.zeros(32))
    keep = mask.repeat_interleave(8, 0).repeat_interleave(8, 1)
    ref = torch.nn.Linear(64, 32)
    with torch.no_grad():
        ref.weight.copy_(dense_w * keep)
        ref.bias.zero_()
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1)
    x, target = torch.randn(16, 64), torch.randn(16, 32)
    for _ in range(5):
        for model, o in ((layer, opt), (ref, opt_ref)):
            o.zero_grad()
            torch.nn.functional.mse_loss(model(x), target).backward()
            if model is ref:
                ref.weight.grad *= keep  # the sparse layer has no gradient off its pattern
            o.step()
    torch.testing.assert_close(layer.to_dense(), ref.weight.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer(x), ref(x), rtol=1e-5, atol=1e-5)


def test_values_moved_by_load_state_dict_and_data_assignment_are_seen():
    layer = BlockSparseLinear(32, 32, block=8, density=0.5, seed=0, bias=False)
    x = torch.randn(3, 32)
    layer.values.data = layer.values.data * 2  # new memory
    torch.testing.assert_close(layer(x), x @ layer.to_dense().T, rtol=1e-5, atol=1e-5)
    state = {"values": torch.ones_like(layer.values)}
    layer.load_state_dict(state)
    torch.testing.assert_close(layer(x), x @ layer.to_dense().T, rtol=1e-5, atol=1e-5)
    assert layer.to_dense().abs().sum() == layer.values.numel()


def test_bad_input_names_the_argument():
    layer = BlockSparseLinear(32, 16, block=8, density=0.5, seed=0)
    with pytest.raises(TypeError, match=r"x: expected dtype torch.float32"):
        layer(torch.randn(2, 32, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"x: expected a contiguous tensor"):
        layer(torch.randn(32, 2).T)
    with pytest.raises(ValueError, match=r"x: expected shape \(\.\.\., 32\)"):
        layer(torch.randn(2, 16))
    with pytest.raises(ValueError, match=r"x: expected a tensor on cpu"):
        layer(torch.empty(2, 32, device="meta"))
