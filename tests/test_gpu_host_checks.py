"""What the second review of the CUDA kernels added: host-driver checks that keep every kernel
index in bounds (``moecore.kernels.cuda``), and the emulation harness reporting warp intrinsics
whose mask names lanes that are not running. Runs on the CPU through the emulation backend;
no test here allocates anything near the sizes it refuses.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from _gpu_emu import EmuBackend, Module

from moecore.kernels import cuda

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="the emulation needs g++")

_EMU = EmuBackend()


def _order(t: int, k: int) -> np.ndarray:
    """A valid order for T tokens, k slots: one padding row, then every assignment once."""
    return np.array([-1, *range(t * k)], np.int32)


# --- warp intrinsics with a mask naming lanes that are not running -------------------------


def _expect_mask_fault(fn, *args) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(RuntimeError, match="mask 0xffffffff"):
        fn(*args)


def test_partial_warp_faults_for_ballot_and_shuffle() -> None:
    x = np.random.default_rng(0).standard_normal(100).astype(np.float32)
    tile_counts = Module("topk").get_function("topk_tile_counts")
    half = np.uint32(0x3F000000)  # the key of 0.5
    gt, eq = np.zeros(3, np.uint32), np.zeros(3, np.uint32)
    _expect_mask_fault(tile_counts, (3,), (48,), (x, np.int32(x.size), half, gt, eq))
    gt, eq = np.zeros(2, np.uint32), np.zeros(2, np.uint32)
    tile_counts((2,), (64,), (x, np.int32(x.size), half, gt, eq))  # whole warps: no fault
    keys = np.abs(x).view(np.uint32)
    assert int(gt.sum()) == int((keys > 0x3F000000).sum())
    assert int(eq.sum()) == int((keys == 0x3F000000).sum())

    t, k, d = 3, 2, 5
    order = _order(t, k)
    backward = Module("moe").get_function("moe_unpermute_backward")
    rows = order.size
    bargs = (
        np.ones((t, d), np.float32),
        np.ones((rows, d), np.float32),
        order,
        np.ones((t, k), np.float32),
        np.int32(rows),
        np.int32(d),
        np.int32(k),
        np.zeros((rows, d), np.float32),
        np.zeros((t, k), np.float32),
    )
    # One warp per row; the last row (assignment 5, not padding) gets a warp of 16 lanes.
    _expect_mask_fault(backward, (1,), (rows * 32 - 16,), bargs)


_EARLY_RETURN = """
extern "C" __global__ void vote_after_return(unsigned* out) {
    if (threadIdx.x == 3) return;  // lane 3 leaves, the others vote naming it
    const unsigned v = __ballot_sync(0xffffffffu, 1);
    if (threadIdx.x == 0) *out = v;
}
"""


def test_full_mask_after_a_lane_returned_is_reported() -> None:
    kern = Module("review-early-return", src=_EARLY_RETURN).get_function("vote_after_return")
    out = np.zeros(1, np.uint32)
    _expect_mask_fault(kern, (1,), (32,), (out,))


# --- host checks: order validated as the CPU does ---------------------------------------------


def _unpermute_backward(order: np.ndarray, t: int = 3, k: int = 2, d: int = 5) -> None:
    r = np.random.default_rng(1)
    cuda.moe_unpermute_backward(
        r.standard_normal((t, d)).astype(np.float32),
        r.standard_normal((order.size, d)).astype(np.float32),
        order,
        r.random((t, k)).astype(np.float32),
        backend=_EMU,
    )


def test_unpermute_backward_refuses_an_order_out_of_range() -> None:
    _unpermute_backward(_order(3, 2))  # valid: runs
    for bad in (6, -2):  # T*k = 6: one past the last assignment; -2: not padding
        order = _order(3, 2)
        order[2] = bad
        with pytest.raises(ValueError, match=r"order: values must be in \[-1, 6\)"):
            _unpermute_backward(order)


def test_unpermute_and_its_backward_refuse_an_assignment_twice() -> None:
    order = _order(3, 2)
    order[4] = 1  # assignment 1 held by rows 1 and 4: two warps would write d_weights[1]
    with pytest.raises(ValueError, match="more than one row"):
        _unpermute_backward(order)
    y_sorted = np.ones((order.size, 4), np.float32)
    with pytest.raises(ValueError, match="more than one row"):
        cuda.moe_unpermute(y_sorted, order, np.ones((3, 2), np.float32), backend=_EMU)
    order[4] = -2
    with pytest.raises(ValueError, match=r"\[-1, 6\)"):
        cuda.moe_unpermute(y_sorted, order, np.ones((3, 2), np.float32), backend=_EMU)


# --- host checks: sizes past int32 refused before anything is allocated ---------------------


def test_permute_refuses_a_padding_past_int32_rows() -> None:
    # Four experts padded to 2^30 rows each: 2^32 rows. In int32 the experts' first rows wrap
    # (2^31 -> -2^31) and moe_build_order would write before `order`.
    x = np.ones((4, 1), np.float32)
    expert_idx = np.arange(4, dtype=np.int32).reshape(4, 1)
    with pytest.raises(ValueError, match="padded row count = 4294967296"):
        cuda.moe_permute(x, expert_idx, 4, pad_to=2**30, backend=_EMU)
    # 2^29 rows of d = 8: the rows fit int32, rows * d does not.
    with pytest.raises(ValueError, match="sorted rows x d = 8"):
        cuda.moe_permute(np.ones((4, 8), np.float32), expert_idx, 4, pad_to=2**27, backend=_EMU)


def test_permute_backward_refuses_tokens_past_int32() -> None:
    empty = np.zeros((0, 4), np.float32)
    no_rows = np.zeros(0, np.int32)
    with pytest.raises(ValueError, match="n_tokens \\* d"):
        cuda.moe_permute_backward(empty, no_rows, 2**30, 1, backend=_EMU)
    with pytest.raises(ValueError, match="n_tokens \\* k"):
        cuda.moe_permute_backward(np.zeros((0, 1), np.float32), no_rows, 2**28, 16, backend=_EMU)


def test_bsr_refuses_outputs_past_int32() -> None:
    b = 8
    w = cuda.BsrDevice((2**20, b), b, np.zeros(2**20 // b + 1, np.int64), [], backend=_EMU)
    data = np.zeros((0, b, b), np.float32)
    x = np.zeros((2**12, b), np.float32)  # 4096 rows x 2^20 outputs = 2^32 > int32
    with pytest.raises(ValueError, match="M \\* out_features"):
        cuda.bsr_linear(x, w, data, backend=_EMU)
    wt = cuda.BsrDevice((b, 2**20), b, np.zeros(2, np.int64), [], backend=_EMU)
    with pytest.raises(ValueError, match="M \\* in_features"):
        cuda.bsr_linear_dx(x, wt, data, backend=_EMU)


def test_bsr_pattern_is_checked_on_construction() -> None:
    b = 4
    ok = cuda.BsrDevice((8, 8), b, [0, 1, 2], [0, 1], backend=_EMU)
    assert ok.nnzb == 2
    bad = {
        "indptr must be 3": ([0, 1], [0]),  # too short: the kernel would read indptr[2]
        "non-decreasing": ([0, 2, 1], [0, 1]),
        "indptr ends at 2, indices has 3": ([0, 1, 2], [0, 1, 1]),
        r"block-columns in \[0, 2\)": ([0, 1, 2], [0, 2]),
    }
    for message, (indptr, indices) in bad.items():
        with pytest.raises(ValueError, match=message):
            cuda.BsrDevice((8, 8), b, indptr, indices, backend=_EMU)
    with pytest.raises(ValueError, match="multiples of the block"):
        cuda.BsrDevice((8, 6), b, [0, 0, 0], [], backend=_EMU)


def test_the_launch_shape_keeps_the_kernels_assumptions() -> None:
    # Whole warps (full-mask ballots and shuffles), a divisor of 2^31 (int thread indices
    # cannot overflow on the last block, see cuda.THREADS) and at most moe_build_order's tile.
    assert cuda.THREADS % 32 == 0
    assert 2**31 % cuda.THREADS == 0
    assert cuda.THREADS <= 256
    assert cuda.launch_grid(2**31 - 1) * cuda.THREADS - 1 <= 2**31 - 1
