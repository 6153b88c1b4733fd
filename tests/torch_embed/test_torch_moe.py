"""moecore.integrations.torch.MoE against a plain torch MoE (forward, every gradient, the
auxiliary losses), torch.autograd.gradcheck in float64, finite differences of the injected
auxiliary gradients, and bad input."""

import pytest

torch = pytest.importorskip("torch", reason="the torch integration tests need PyTorch")
F = torch.nn.functional

from moecore.integrations.torch import MoE, MoEFunction  # noqa: E402


def reference_moe(x, router, w1, w2, k, score, aux_coef, z_coef):
    """A routed MoE written with plain torch ops: ``(y, aux, z)``, the Switch loss with the
    dispatch fractions held constant, the z-loss the mean squared log-sum-exp."""
    lead, d = x.shape[:-1], x.shape[-1]
    t = x.reshape(-1, d)
    n_tok, e = t.shape[0], router.shape[0]
    logits = t @ router.T
    probs = torch.softmax(logits, -1) if score == "softmax" else torch.sigmoid(logits)
    top_p, top_i = probs.topk(k, dim=-1)
    weights = top_p / top_p.sum(-1, keepdim=True) if k > 1 else top_p
    y = torch.zeros(n_tok, w2.shape[2], dtype=x.dtype)
    for j in range(e):
        tok, slot = (top_i == j).nonzero(as_tuple=True)
        out = F.gelu(t[tok] @ w1[j], approximate="tanh") @ w2[j]
        y = y.index_add(0, tok, weights[tok, slot].unsqueeze(1) * out)
    p = probs if score == "softmax" else probs / probs.sum(1, keepdim=True)
    f = torch.bincount(top_i.flatten(), minlength=e).to(x.dtype) / (n_tok * k)
    aux = aux_coef * e * (f * p.mean(0)).sum()
    z = z_coef * (torch.logsumexp(logits, -1) ** 2).mean()
    return y.reshape(*lead, -1), aux, z


def _layer(dtype, k=2, score="softmax", aux=0.01, z=0.001, seed=0, d=16, hidden=24, e=4):
    torch.manual_seed(seed)
    layer = MoE(d, hidden, e, k, score=score, aux_loss=aux, z_loss=z, dtype=dtype)
    with torch.no_grad():  # larger than the default init: outputs and routing well separated
        layer.router.normal_(0, 0.5)
        layer.w1.normal_(0, 0.3)
        layer.w2.normal_(0, 0.3)
    return layer


@pytest.mark.parametrize(
    ("dtype", "tol"), [(torch.float32, 2e-4), (torch.float64, 1e-10)], ids=["f32", "f64"]
)
@pytest.mark.parametrize(("k", "score"), [(2, "softmax"), (1, "softmax"), (2, "sigmoid")])
def test_forward_and_every_gradient_equal_a_plain_torch_moe(dtype, tol, k, score):
    layer = _layer(dtype, k, score)
    x = torch.randn(3, 8, 16, dtype=dtype, requires_grad=True)
    g = torch.randn(3, 8, 16, dtype=dtype)
    y = layer(x)
    (y * g).sum().backward()  # the auxiliary gradients are injected by the layer

    params = [p.detach().clone().requires_grad_() for p in (layer.router, layer.w1, layer.w2)]
    x_ref = x.detach().clone().requires_grad_()
    y_ref, aux, z = reference_moe(x_ref, *params, k, score, layer.aux_loss, layer.z_loss)
    ((y_ref * g).sum() + aux + z).backward()

    torch.testing.assert_close(y, y_ref, rtol=tol, atol=tol)
    assert layer.last_stats["aux_loss"] == pytest.approx(aux.item(), rel=tol)
    assert layer.last_stats["z_loss"] == pytest.approx(z.item(), rel=tol)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=tol, atol=tol)
    for p, ref in zip((layer.router, layer.w1, layer.w2), params):
        torch.testing.assert_close(p.grad, ref.grad, rtol=tol, atol=tol)


def test_eval_mode_adds_no_auxiliary_gradient():
    layer = _layer(torch.float64).eval()
    x = torch.randn(10, 16, dtype=torch.float64)
    (layer(x) * 0).sum().backward()
    assert torch.count_nonzero(layer.router.grad) == 0


@pytest.mark.parametrize(("k", "score"), [(2, "softmax"), (1, "sigmoid")])
def test_gradcheck_in_float64(k, score):
    torch.manual_seed(1)
    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    router = (torch.randn(3, 4, dtype=torch.float64) * 0.7).requires_grad_()
    w1 = (torch.randn(3, 4, 5, dtype=torch.float64) * 0.5).requires_grad_()
    w2 = (torch.randn(3, 5, 4, dtype=torch.float64) * 0.5).requires_grad_()
    options = {"k": k, "score": score}
    assert torch.autograd.gradcheck(
        lambda *a: MoEFunction.apply(*a, options), (x, router, w1, w2), eps=1e-6, atol=1e-6
    )


def test_injected_auxiliary_gradient_equals_finite_differences():
    """With a zero output gradient, the router's gradient is the injected d(aux + z)/d router,
    checked entry by entry against central differences of the losses the layer reports."""
    layer = _layer(torch.float64, aux=0.3, z=0.05)
    x = torch.randn(12, 16, dtype=torch.float64)
    (layer(x) * 0).sum().backward()

    def losses():
        with torch.no_grad():
            layer(x)
        return layer.last_stats["aux_loss"] + layer.last_stats["z_loss"]

    eps = 1e-6
    for i, j in [(0, 0), (1, 5), (2, 11), (3, 15)]:
        with torch.no_grad():
            layer.router[i, j] += eps
        up = losses()
        with torch.no_grad():
            layer.router[i, j] -= 2 * eps
        down = losses()
        with torch.no_grad():
            layer.router[i, j] += eps
        assert layer.router.grad[i, j].item() == pytest.approx((up - down) / (2 * eps), abs=1e-7)


def test_aux_loss_scale_scales_the_injected_gradient():
    layer = _layer(torch.float64, aux=0.2, z=0.0)
    x = torch.randn(12, 16, dtype=torch.float64)
    (layer(x) * 0).sum().backward()
    once = layer.router.grad.clone()
    layer.router.grad = None
    layer.aux_loss_scale = 0.25
    (layer(x) * 0).sum().backward()
    torch.testing.assert_close(layer.router.grad, 0.25 * once)
    assert torch.count_nonzero(once) > 0


def test_layer_trains_in_a_torch_optimizer_loop():
    torch.manual_seed(0)
    layer = MoE(8, 16, 4, 2)
    target = torch.nn.Linear(8, 8)
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    x = torch.randn(64, 8)
    with torch.no_grad():
        want = target(x)
    first = None
    for _ in range(60):
        opt.zero_grad()
        loss = F.mse_loss(layer(x), want)
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
    assert loss.item() < 0.5 * first


@pytest.mark.parametrize(
    ("make", "error", "pattern"),
    [
        (
            lambda: torch.randn(4, 16, dtype=torch.float64),
            TypeError,
            r"x: expected dtype torch.float32",
        ),
        (lambda: torch.randn(16, 4).T, ValueError, r"x: expected a contiguous tensor"),
        (lambda: torch.empty(4, 16, device="meta"), ValueError, r"x: expected a tensor on cpu"),
        (lambda: torch.randn(4, 15), ValueError, r"x: expected shape \(\.\.\., 16\)"),
        (lambda: [[0.0] * 16], TypeError, r"x: expected a torch.Tensor, got list"),
    ],
)
def test_bad_input_is_a_clear_error_naming_the_argument(make, error, pattern):
    layer = MoE(16, 8, 4, 2)
    with pytest.raises(error, match=pattern):
        layer(make())


def test_bad_configuration_is_a_clear_error():
    with pytest.raises(TypeError, match=r"dtype: expected torch.float32 or torch.float64"):
        MoE(16, 8, 4, 2, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"top_k: expected an integer in \[1, 4\]"):
        MoE(16, 8, 4, 5)
    layer = MoE(16, 8, 4, 2)
    layer.w1 = torch.nn.Parameter(layer.w1.detach().transpose(1, 2).contiguous().transpose(1, 2))
    with pytest.raises(ValueError, match=r"w1: expected a contiguous tensor"):
        layer(torch.randn(4, 16))
