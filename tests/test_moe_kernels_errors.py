"""Bad input to the MoE kernels: a ValueError naming the argument, the expected and the actual
value — never a crash, a hang or silently wrong numbers."""

import re

import numpy as np
import pytest

from moecore import moe_kernels as mk

F32 = np.float32
I32 = np.int32


def raises(pattern):
    return pytest.raises(ValueError, match=pattern)


LOGITS = np.zeros((4, 8), F32)
X = np.ones((4, 6), F32)
IDX = np.array([[0, 1], [2, 3], [4, 5], [6, 7]], I32)
W = np.full((4, 2), 0.5, F32)


@pytest.mark.parametrize(
    ("call", "pattern"),
    [
        (
            lambda: mk.route(LOGITS.astype(np.float64), 2),
            r"logits: expected a 2-D numpy array of float32, "
            r"got an array of dtype float64 and shape \[4, 8\]",
        ),
        (
            lambda: mk.route(LOGITS[0], 2),
            r"logits: expected a 2-D numpy array of float32, "
            r"got an array of dtype float32 and shape \[8\]",
        ),
        (
            lambda: mk.route([[0.0, 1.0]], 1),
            r"logits: expected a 2-D numpy array of float32, got an object of type list",
        ),
        (lambda: mk.route(np.zeros((8, 4), F32).T, 2), r"logits: expected a C-contiguous array"),
        (lambda: mk.route(LOGITS, 9), r"k: expected an integer in \[1, 8\] \(E\), got 9"),
        (lambda: mk.route(LOGITS, 0), r"k: expected an integer in \[1, 8\] \(E\), got 0"),
        (lambda: mk.route(LOGITS, -1), r"k: expected a non-negative integer, got -1"),
        (lambda: mk.route(LOGITS, 2.5), r"k: expected an integer, got 2.5"),
        (lambda: mk.route(LOGITS, True), r"k: expected an integer, got True"),
        (
            lambda: mk.route(LOGITS, 2, "relu"),
            r"score: expected \"softmax\" or \"sigmoid\", got 'relu'",
        ),
        (
            lambda: mk.route(LOGITS, 2, bias=np.zeros(7, F32)),
            r"bias: expected shape \[8\], got \[7\]",
        ),
        (
            lambda: mk.route(LOGITS, 2, bias=np.zeros(8)),
            r"bias: expected a 1-D numpy array of float32",
        ),
        (
            lambda: mk.route(np.full((2, 8), np.nan, F32), 2),
            r"logits\[0, 0\]: expected a finite value, got NaN",
        ),
        (
            lambda: mk.route(LOGITS, 2, n_groups=3, topk_groups=1),
            r"n_groups: expected a divisor of E = 8, got 3",
        ),
        (
            lambda: mk.route(LOGITS, 2, n_groups=4, topk_groups=5),
            r"topk_groups: expected an integer in \[1, 4\] \(n_groups\), got 5",
        ),
        (
            lambda: mk.route(LOGITS, 3, n_groups=4, topk_groups=1),
            r"k: expected at most topk_groups \* E / n_groups = 1 \* 8 / 4 = 2, got 3",
        ),
        (
            lambda: mk.route(LOGITS, 2, n_groups=4),
            r"topk_groups: expected an integer when n_groups is given, got None",
        ),
        (
            lambda: mk.route(np.zeros((3, 0), F32), 1),
            r"logits: expected shape \[T, E\] with 1 <= E < 2\^31, got \[3, 0\]",
        ),
        (
            lambda: mk.route_backward(np.zeros((4, 3), F32), IDX, LOGITS),
            r"d_weights: expected shape \[4, 2\], got \[4, 3\]",
        ),
        (
            lambda: mk.route_backward(W, IDX + 1, LOGITS),
            r"expert_idx\[3, 1\]: expected an expert index in \[0, 8\), got 8",
        ),
        (
            lambda: mk.route_backward(W, IDX.astype(np.int64), LOGITS),
            r"expert_idx: expected a 2-D numpy array of int32, got an array of dtype int64",
        ),
        (lambda: mk.route_backward(W, IDX, LOGITS, "tanh"), r"score: expected"),
    ],
)
def test_route_rejects(call, pattern):
    with raises(pattern):
        call()


@pytest.mark.parametrize(
    ("call", "pattern"),
    [
        (
            lambda: mk.permute(X, IDX, 7),
            r"expert_idx\[3, 1\]: expected an expert index in \[0, 7\), got 7",
        ),
        (
            lambda: mk.permute(X, -IDX, 8),
            r"expert_idx\[0, 1\]: expected an expert index in \[0, 8\), got -1",
        ),
        (
            lambda: mk.permute(X, IDX, 1),
            r"expert_idx: expected shape \[T, k\] with 1 <= k <= n_experts = 1, got \[4, 2\]",
        ),
        (
            lambda: mk.permute(X, np.zeros((4, 0), I32), 8),
            r"expert_idx: expected shape \[T, k\] with 1 <= k <= n_experts = 8, got \[4, 0\]",
        ),
        (
            lambda: mk.permute(X[:3], IDX, 8),
            r"expert_idx: expected shape \[T, k\] with T = 3 \(rows of x\), got \[4, 2\]",
        ),
        (lambda: mk.permute(X, IDX, 0), r"n_experts: expected an integer in \[1, 2\^31\), got 0"),
        (
            lambda: mk.permute(X.astype(np.float16), IDX, 8),
            r"x: expected a 2-D numpy array of float32, got an array of dtype float16",
        ),
        (lambda: mk.permute(X[:, ::2], IDX, 8), r"x: expected a C-contiguous array"),
        (
            lambda: mk.permute(X, IDX, 8, capacity=1),
            r"weights: expected an array of shape \[T, k\] when capacity is given, got None",
        ),
        (
            lambda: mk.permute(X, IDX, 8, capacity=-1, weights=W),
            r"capacity: expected a non-negative integer, got -1",
        ),
        (
            lambda: mk.permute(X, IDX, 8, weights=W[:3]),
            r"weights: expected shape \[4, 2\], got \[3, 2\]",
        ),
        (
            lambda: mk.permute(X, IDX, 8, capacity=1, weights=np.full((4, 2), np.nan, F32)),
            r"weights\[0, 0\]: expected a finite value, got NaN",
        ),
        (lambda: mk.permute(X, IDX, 8, pad_to=0), r"pad_to: expected an integer >= 1, got 0"),
        (
            lambda: mk.permute(X, IDX, 8, pad_to=2**40),
            r"pad_to: expected a value keeping the padded rows below 2\^31",
        ),
    ],
)
def test_permute_rejects(call, pattern):
    with raises(pattern):
        call()


YS = np.ones((5, 3), F32)
ORDER = np.array([0, 3, -1, 5, 6], I32)  # T = 4, k = 2


@pytest.mark.parametrize(
    ("call", "pattern"),
    [
        (
            lambda: mk.unpermute(YS, np.array([0, 8, -1, 1, 2], I32), W),
            r"order\[1\]: expected -1 \(padding\) or an assignment index in "
            r"\[0, n_tokens \* k = 8\), got 8",
        ),
        (
            lambda: mk.unpermute(YS, np.array([0, 1, -2, 3, 4], I32), W),
            r"order\[2\]: expected -1 \(padding\) or an assignment index in "
            r"\[0, n_tokens \* k = 8\), got -2",
        ),
        (
            lambda: mk.unpermute(YS, np.array([0, 1, 2, 1, 4], I32), W),
            r"order\[3\]: expected each assignment at most once, but row 1 already holds it, got 1",
        ),
        (
            lambda: mk.unpermute(YS, ORDER[:4], W),
            r"order: expected shape \[5\] \(one entry per sorted row\), got \[4\]",
        ),
        (
            lambda: mk.unpermute(YS, ORDER.astype(np.int64), W),
            r"order: expected a 1-D numpy array of int32",
        ),
        (
            lambda: mk.unpermute(YS, ORDER, None),
            r"n_tokens, k: expected both integers when weights is None",
        ),
        (
            lambda: mk.unpermute(YS, ORDER, W, k=3),
            r"weights: expected shape \[4, 3\], got \[4, 2\]",
        ),
        (
            lambda: mk.unpermute(YS, ORDER, [[1.0, 1.0]]),
            r"weights: expected a 2-D numpy array of float32 \[T, k\], got list",
        ),
        (
            lambda: mk.unpermute(YS, ORDER, None, n_tokens=4, k=0),
            r"k: expected an integer >= 1, got 0",
        ),
        (
            lambda: mk.unpermute(YS, ORDER, None, n_tokens=-4, k=2),
            r"n_tokens: expected a non-negative integer, got -4",
        ),
        (
            lambda: mk.permute_backward(YS, ORDER, 2, 2),
            r"order\[3\]: expected -1 \(padding\) or an assignment index in "
            r"\[0, n_tokens \* k = 4\), got 5",
        ),
        (
            lambda: mk.unpermute_backward(np.ones((4, 2), F32), YS, ORDER, W),
            r"dy: expected shape \[4, 3\], got \[4, 2\]",
        ),
        (
            lambda: mk.unpermute_backward(
                np.ones((4, 3), F32), YS, np.array([7, 7, -1, -1, -1], I32), W
            ),
            r"order\[1\]: expected each assignment at most once",
        ),
    ],
)
def test_unpermute_rejects(call, pattern):
    with raises(pattern):
        call()


XS = np.ones((6, 4), F32)
COUNTS = np.array([2, 0, 4], I32)
WE = np.ones((3, 4, 5), F32)


@pytest.mark.parametrize(
    ("call", "pattern"),
    [
        (
            lambda: mk.grouped_matmul(XS, np.array([2, 2, 4], I32), WE),
            r"counts: expected entries summing to R = 6 \(rows of x_sorted\), "
            r"got entries summing to 8",
        ),
        (
            lambda: mk.grouped_matmul(XS, np.array([8, -2, 0], I32), WE),
            r"counts\[1\]: expected a non-negative row count, got -2",
        ),
        (
            lambda: mk.grouped_matmul(XS, np.array([6, 0], I32), WE),
            r"counts: expected shape \[3\] \(experts in w\), got \[2\]",
        ),
        (
            lambda: mk.grouped_matmul(XS, COUNTS.astype(np.int64), WE),
            r"counts: expected a 1-D numpy array of int32",
        ),
        (
            lambda: mk.grouped_matmul(XS, COUNTS, np.ones((3, 5, 5), F32)),
            r"x_sorted: expected shape \[R, 5\] \(d_in of w\), got \[6, 4\]",
        ),
        (
            lambda: mk.grouped_matmul(XS, COUNTS, np.ones((3, 4), F32)),
            r"w: expected a 3-D numpy array of float32",
        ),
        (
            lambda: mk.grouped_matmul_dx(np.ones((6, 4), F32), COUNTS, WE),
            r"dy: expected shape \[R, 5\] \(d_out of w\), got \[6, 4\]",
        ),
        (
            lambda: mk.grouped_matmul_dx(np.ones((6, 5), F32), np.array([1, 1, 1], I32), WE),
            r"counts: expected entries summing to R = 6 \(rows of dy\)",
        ),
        (
            lambda: mk.grouped_matmul_dw(XS, np.ones((5, 5), F32), COUNTS),
            r"dy: expected shape \[6, d_out\] \(R = rows of x_sorted\), got \[5, 5\]",
        ),
        (
            lambda: mk.grouped_matmul_dw(XS, np.ones((6, 5), F32), np.array([7, -1, 0], I32)),
            r"counts\[1\]: expected a non-negative row count, got -1",
        ),
    ],
)
def test_grouped_matmul_rejects(call, pattern):
    with raises(pattern):
        call()


def test_messages_name_argument_expected_and_actual():
    with pytest.raises(ValueError) as info:
        mk.permute(X, IDX, 4)
    msg = str(info.value)
    assert re.fullmatch(r"expert_idx\[\d+, \d+\]: expected .+, got \d+", msg), msg


def test_absurd_output_sizes_raise_memory_error_not_abort():
    # Zero-width inputs cost nothing, yet ask for a (2^31 - 1) x 2^12 float32 result (32 TiB):
    # the allocator's refusal must be a MemoryError, not an abort of the process.
    rows = 2**31 - 1
    x = np.ones((rows, 0), F32)
    w = np.ones((1, 0, 1 << 12), F32)
    with pytest.raises(MemoryError, match="out: cannot allocate 35184372072448 bytes"):
        mk.grouped_matmul(x, np.array([rows], I32), w)
