"""Distributed training: process groups and data parallelism.

``init()`` returns the world group: :class:`MPIGroup` under ``mpiexec`` (mpi4py's buffer
API), :class:`SingleProcess` otherwise (mpi4py is then never imported), or an
:class:`NCCLGroup` on GPUs. :class:`DataParallel` averages a model's gradients over a group,
launching buckets during backward as :mod:`moecore.comm` decides;
:class:`ExpertParallelMoE` spreads an MoE layer's experts over a group (all-to-all-v).
"""

from __future__ import annotations

from moecore.dist.data_parallel import DataParallel, parse_compress
from moecore.dist.expert_parallel import ExpertParallelMoE
from moecore.dist.group import Group, Request, SingleProcess
from moecore.dist.hierarchical import HierarchicalGroup
from moecore.dist.launch import abort_job, init, launched_by_mpi, world_size_from_env
from moecore.dist.mpi import MPIGroup
from moecore.dist.nccl import NCCLGroup

__all__ = [
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
