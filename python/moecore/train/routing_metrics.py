"""Per-step router metrics of the MoE layers: auxiliary and z losses, router entropy and
dead experts, summed over micro-batches (and averaged over data-parallel ranks)."""

from __future__ import annotations

from typing import Any

import numpy as np

from moecore.distributed import Group


class RoutingTotals:
    """Accumulates, per MoE layer, the aux loss, z loss and router entropy of each
    micro-batch (as the mean over the step's micro-batches)."""

    def __init__(self, n_layers: int, micro_batches: int) -> None:
        self._sums = np.zeros((3, n_layers), np.float64)
        self._weight = 1.0 / micro_batches

    def add(self, layers: list[Any]) -> None:
        """Adds the ``last_stats`` of every layer after a micro-batch's forward."""
        for i, layer in enumerate(layers):
            self.add_layer(i, layer)

    def add_layer(self, i: int, layer: Any) -> None:
        """Adds layer ``i``'s ``last_stats`` after a micro-batch's forward."""
        s = layer.last_stats
        self._sums[:, i] += self._weight * np.array(
            [s.get("aux_loss", 0.0), s.get("z_loss", 0.0), s.get("router_entropy", 0.0)]
        )

    def allreduce(self, group: Group, replicas: int | None = None) -> None:
        """Averages the totals over the ranks of ``group`` (each saw its own rows), or sums
        them and divides by ``replicas`` (pipeline parallel: each layer's statistics come
        from one rank of each data-parallel replica)."""
        group.allreduce(self._sums)
        self._sums /= group.size if replicas is None else replicas

    def record(self, loads: list[np.ndarray]) -> dict[str, Any]:
        """The metrics fields: per layer ``aux_loss``, ``z_loss``, ``router_entropy`` (nats)
        and ``dead_experts`` (experts that got no token this step, from ``loads``)."""
        return {
            "aux_loss": self._sums[0].tolist(),
            "z_loss": self._sums[1].tolist(),
            "router_entropy": self._sums[2].tolist(),
            "dead_experts": [int((np.asarray(load) == 0).sum()) for load in loads],
        }
