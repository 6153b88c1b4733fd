"""The top-k DDP communication hook with 2 gloo processes: equal to a manual top-k +
error-feedback average (computed here in numpy from each rank's local gradients), and a short
training under the hook converges with the ranks in step."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the torch integration tests need PyTorch")

WORKER = Path(__file__).with_name("ddp_worker.py")


def _run(mode, tmp_path, world=2):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    outs = [tmp_path / f"{mode}{r}.npz" for r in range(world)]
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(r), str(world), str(port), mode, str(outs[r])],
            env=env,
        )
        for r in range(world)
    ]
    try:
        codes = [p.wait(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert codes == [0] * world, f"ranks exited with {codes}"
    return [np.load(o) for o in outs]


def manual_topk_average(local, ratios):
    """Step 0 dense; then per rank r <- r + g, send the k largest |r| (k = max(1,
    floor(ratio·n + 1/2))) and keep the rest; the average of what every rank sent."""
    world, steps, n = local.shape
    residual = np.zeros((world, n), np.float32)
    out = [local[:, 0].mean(axis=0)]
    for step in range(1, steps):
        k = max(1, int(ratios[step - 1] * n + 0.5))
        total = np.zeros(n, np.float64)
        for r in range(world):
            residual[r] += local[r, step]
            idx = np.argsort(-np.abs(residual[r]), kind="stable")[:k]
            total[idx] += residual[r, idx]
            residual[r, idx] = 0
        out.append((total / world).astype(np.float32))
    return np.stack(out)


@pytest.mark.slow
def test_two_gloo_ranks_equal_a_manual_topk_error_feedback_average(tmp_path):
    ranks = _run("equal", tmp_path)
    local = np.stack([r["local"] for r in ranks])
    # TopK(0.05, warmup_steps=1, warmup_start=0.25): one step at each DGC stage 0.25, 0.0625,
    # then 0.05; the hook's first step (dense_steps=1) is a plain all-reduce average.
    want = manual_topk_average(local, [0.25, 0.0625, 0.05, 0.05])
    for r in ranks:
        np.testing.assert_allclose(r["averaged"], want, rtol=1e-6, atol=1e-6)
    n = local.shape[2]
    assert int(ranks[0]["bytes_sent"]) < 4 * n * 5  # fewer bytes than five dense steps


@pytest.mark.slow
def test_training_with_the_hook_converges_with_ranks_in_step(tmp_path):
    ranks = _run("train", tmp_path)
    for r in ranks:
        losses, dense = r["losses"], r["dense_losses"]
        assert losses[0] == dense[0]  # same start
        assert losses[-1] < 0.1 * losses[0], (losses[0], losses[-1])
        assert losses[-1] < 1.5 * dense[-1], (losses[-1], dense[-1])  # near plain DDP
    np.testing.assert_array_equal(ranks[0]["params"], ranks[1]["params"])
