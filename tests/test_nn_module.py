"""Module semantics: registration, state_dict round trip, strict loading, modes, to()."""

import numpy as np
import pytest

import moecore as mc
from moecore import nn


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(4)
        self.ff = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 4, bias=False))
        self.drop = nn.Dropout(0.5)
        self.register_buffer("steps", np.zeros(1, np.int64))
        self.note = "not registered"

    def forward(self, x):
        return self.drop(self.ff(self.norm(x)))


def test_registration_and_dotted_names():
    b = Block()
    names = [n for n, _ in b.named_parameters()]
    assert names == ["norm.weight", "norm.bias", "ff.0.weight", "ff.0.bias", "ff.1.weight"]
    assert list(b.state_dict()) == [*names, "steps"]
    assert [type(m).__name__ for m in b.modules()][:3] == ["Block", "LayerNorm", "Sequential"]
    b.ff = nn.Linear(4, 4)  # reassigning replaces the registration
    assert "ff.weight" in b.state_dict() and "ff.0.weight" not in b.state_dict()


def test_state_dict_round_trip_and_strict_errors():
    mc.manual_seed(0)
    a, b = Block(), Block()
    b.load_state_dict(a.state_dict())
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert na == nb
        np.testing.assert_array_equal(pa.data, pb.data)
        assert pa.data is not pb.data  # copied in place, not shared
    sd = dict(a.state_dict())
    sd.pop("norm.bias")
    sd["extra.weight"] = np.zeros(1)
    with pytest.raises(
        KeyError, match=r"missing keys \['norm.bias'\], unexpected keys \['extra.weight'\]"
    ):
        b.load_state_dict(sd)
    missing, unexpected = b.load_state_dict(sd, strict=False)
    assert missing == ["norm.bias"] and unexpected == ["extra.weight"]
    bad = dict(a.state_dict())
    bad["ff.0.weight"] = np.zeros((3, 3), np.float32)
    with pytest.raises(ValueError, match=r"ff.0.weight: saved \(3, 3\), model \(8, 4\)"):
        b.load_state_dict(bad)


def test_train_eval_switches_dropout():
    b = Block()
    x = mc.ones(2, 4)
    b.eval()
    assert not b.drop.training
    np.testing.assert_array_equal(b(x).data, b(x).data)
    b.train()
    assert b.drop.training and b.ff.training


def test_to_dtype_keeps_parameter_identity_and_zero_grad():
    b = Block()
    params = list(b.parameters())
    b(mc.ones(2, 4)).sum().backward()
    assert all(p.grad is not None for p in params)
    b.zero_grad()
    assert all(p.grad is None for p in params)
    b.to(dtype=np.float64)
    assert [id(p) for p in b.parameters()] == [id(p) for p in params]
    assert all(p.dtype == np.float64 for p in b.parameters())


def test_apply_and_repr():
    b = Block()
    seen = []
    b.apply(lambda m: seen.append(type(m).__name__))
    assert seen[-1] == "Block" and "Linear" in seen
    text = repr(b)
    assert "(ff): Sequential(" in text and "in_features=4, out_features=8" in text


def test_linear_matches_numpy_and_module_list():
    lin = nn.Linear(3, 2)
    x = np.random.default_rng(0).standard_normal((5, 3)).astype(np.float32)
    np.testing.assert_allclose(
        lin(mc.Tensor(x)).data, x @ lin.weight.data.T + lin.bias.data, rtol=1e-6
    )
    ml = nn.ModuleList([nn.Linear(2, 2) for _ in range(3)])
    assert len(ml) == 3 and len(list(ml.parameters())) == 6
    assert next(iter(ml.state_dict())) == "0.weight"


def test_attention_module_checks_shapes():
    with pytest.raises(ValueError, match="divisible"):
        nn.Attention(10, 3)
    att = nn.Attention(8, 2)
    with pytest.raises(ValueError, match=r"\[batch, T, 8\]"):
        att(mc.ones(2, 8))
    assert att(mc.randn(2, 3, 8)).shape == (2, 3, 8)


def test_whole_module_gradcheck():
    from moecore.autograd import gradcheck

    mc.manual_seed(1)
    b = Block().to(dtype=np.float64)
    b.drop.p = 0.0
    x = mc.Tensor(np.random.default_rng(2).standard_normal((2, 3, 4)), requires_grad=True)
    assert gradcheck(lambda x, *params: b(x), [x, *b.parameters()])


def test_assigning_to_a_buffer_keeps_it_in_state_dict():
    # ``self.steps += 1`` rebinds the attribute: it must stay a registered buffer (it used to
    # become a plain attribute, so a router bias vanished from checkpoints after one update).
    b = Block()
    b.steps += 1
    b.steps = b.steps + 1
    assert b.state_dict()["steps"].tolist() == [2]
    assert "steps" not in b.__dict__


def test_moe_router_bias_stays_in_state_dict_after_an_update():
    layer = nn.MoE(8, 6, 4, bias_update_rate=0.1)
    layer(mc.randn(5, 8))
    layer.update_bias()
    saved = layer.state_dict()["expert_bias"]
    assert np.abs(saved).sum() > 0
    fresh = nn.MoE(8, 6, 4, bias_update_rate=0.1)
    fresh.load_state_dict(layer.state_dict())
    np.testing.assert_array_equal(fresh.expert_bias, saved)
