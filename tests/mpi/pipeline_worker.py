"""Run under ``mpiexec -n 2 python -m mpi4py pipeline_worker.py MODE``: a 2-stage pipeline
(1F1B, 4 micro-batches) of a tiny model whose stage 1 hangs (``stuck``) or dies
(``killed``) in micro-batch 1's forward; stage 0's receive is bounded by the group's
timeout (2 s) and ends the job naming the stage and the message."""

from __future__ import annotations

import os
import signal
import sys
import time

import numpy as np

import moecore.distributed as dist
from moecore.distributed.pipeline import PipelineEngine, schedule
from moecore.models import ModelConfig, MoETransformer

CFG = ModelConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=2, seq_len=8, n_experts=4)


class Stages:
    def __init__(self, rank: int, mode: str) -> None:
        self.model, self.rank, self.mode = MoETransformer(CFG), rank, mode
        rng = np.random.default_rng(0)
        self.batches = [
            (rng.integers(0, 32, (2, 8)), rng.integers(0, 32, (2, 8))) for _ in range(4)
        ]

    def forward(self, stage, mb, x):
        ids, targets = self.batches[mb]
        if stage == 1 and mb == 1:
            print(f"STAGE 1 {self.mode} in micro-batch 1", flush=True)
            if self.mode == "stuck":
                time.sleep(600)
            os.kill(os.getpid(), signal.SIGKILL)
        if stage == 0:
            return self.model.run_blocks(self.model.embed(ids), 0, 1)
        return self.model.head(self.model.run_blocks(x, 1, 2), targets)


if __name__ == "__main__":
    group = dist.init(timeout=2.0)
    s = schedule("1f1b", 2, 4)
    PipelineEngine(s, group, Stages(group.rank, sys.argv[1]), (2, 8, 16)).run(0.25)
    print("finished?", flush=True)
