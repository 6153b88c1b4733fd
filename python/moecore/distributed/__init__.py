"""Distributed training: process groups and data parallelism.

``init()`` returns the world group: :class:`MPIGroup` under ``mpiexec`` (mpi4py's buffer
API), :class:`SingleProcess` otherwise (mpi4py is then never imported), or an
:class:`NCCLGroup` on GPUs. :class:`DataParallel` averages a model's gradients over a group,
launching buckets during backward as :mod:`moecore.comm` decides;
:class:`ExpertParallelMoE` spreads an MoE layer's experts over a group: an ``nn.MoE`` whose
op exchanges token rows with the other ranks through :class:`AllToAllExchange`.
"""

from __future__ import annotations

from moecore.distributed.data_parallel import DataParallel, parse_compress
from moecore.distributed.expert_parallel import AllToAllExchange, ExpertParallelMoE
from moecore.distributed.group import Group, Request, SingleProcess
from moecore.distributed.hierarchical import HierarchicalGroup
from moecore.distributed.launch import abort_job, init, launched_by_mpi, world_size_from_env
from moecore.distributed.mpi import MPIGroup
from moecore.distributed.nccl import NCCLGroup

__all__ = [
    "AllToAllExchange",
    "DataParallel",
    "ExpertParallelMoE",
    "Group",
    "HierarchicalGroup",
    "MPIGroup",
    "NCCLGroup",
    "Request",
    "SingleProcess",
    "abort_job",
    "init",
    "launched_by_mpi",
    "parse_compress",
    "world_size_from_env",
]
