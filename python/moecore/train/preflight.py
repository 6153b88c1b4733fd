"""Memory pre-flight: an estimate of a training step's peak memory on one rank, from the run
configuration alone (nothing allocated), checked against the memory the machine has before
the first step, so an impossible setting is refused at once instead of dying in a step.

The estimate counts float32 parameters, their gradients, AdamW's two moments (each divided
by the ranks that share it under ZeRO: optimizer state from stage 1, gradients from 2,
parameters from 3 — the replicated ones over the world, an expert's over its replicas), the
activations one micro-batch keeps for backward in every layer (attention probabilities
apart: ``rows × heads × seq_len²`` per layer, what grows fastest), the logits of the output
layer, and the process's own baseline (Python, numpy, the extension). ``benches/py/soak.py
--estimate`` compares it with the measured peak RSS of the presets."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_F32 = 4
#: Python + numpy + the extension + the built-in corpus: the RSS of a moe-tiny trainer
#: before its first step was 84 MiB (moe-small: 113 MiB, with 38 MiB of parameters).
BASELINE_BYTES = 100 << 20
_GIB = 1 << 30


@dataclass
class MemoryEstimate:
    """Peak bytes of one rank's training step, by part, and the keys each part grows with."""

    parameters: int
    gradients: int
    optimizer: int
    activations: int
    attention: int
    logits: int
    baseline: int = BASELINE_BYTES

    @property
    def total(self) -> int:
        """The estimated peak, bytes."""
        return (
            self.parameters
            + self.gradients
            + self.optimizer
            + self.activations
            + self.attention
            + self.logits
            + self.baseline
        )

    def parts(self) -> list[tuple[str, int, str]]:
        """(part, bytes, the configuration keys that drive it), largest first."""
        rows = [
            ("parameters", self.parameters, "d_model, n_layers, n_experts, d_ff, vocab_size"),
            ("gradients", self.gradients, "d_model, n_layers, n_experts, d_ff, vocab_size"),
            ("optimizer state", self.optimizer, "d_model, n_layers, n_experts, d_ff"),
            ("activations", self.activations, "batch_size, seq_len, d_model, top_k, d_ff"),
            ("attention probabilities", self.attention, "batch_size, n_heads, seq_len², n_layers"),
            ("logits", self.logits, "batch_size, seq_len, vocab_size"),
        ]
        return sorted(rows, key=lambda r: -r[1])

    def describe(self) -> str:
        """One line: the total and its three largest parts."""
        top = ", ".join(f"{name} {_fmt(b)}" for name, b, _ in self.parts()[:3])
        return f"~{_fmt(self.total)} peak estimated ({top})"


def _fmt(n: int) -> str:
    if n >= 1 << 1000:  # beyond a float (absurd keys such as d_model = 10**200)
        return f"~10^{len(str(n)) - 1} bytes"
    return f"{n / _GIB:.1f} GiB" if n >= _GIB else f"{n / (1 << 20):.0f} MiB"


def count_parameters(c: Any) -> tuple[int, int]:
    """(all parameters, routed-expert parameters) of the model of run configuration ``c``."""
    d = c.d_model
    gate = 2 if c.activation == "swiglu" else 1
    norm = 2 * d if c.norm == "layernorm" else d
    total = c.vocab_size * d + (c.seq_len * d if c.position == "learned" else 0) + norm
    experts = 0
    bias = bool(getattr(c, "bias", False))  # qkv/out-projection and expert b1/b2 biases
    for i in range(c.n_layers):
        total += 2 * norm + 4 * d * d + (4 * d if bias else 0)  # norms, qkv, out projection
        moe = i >= c.first_dense_layers and (i - c.first_dense_layers) % c.moe_every == 0
        if moe:
            layer_experts = c.n_experts * (d * gate * c.d_ff + c.d_ff * d)
            if bias:
                layer_experts += c.n_experts * (gate * c.d_ff + d)
            shared = c.n_shared_experts * c.d_ff * d * (gate + 1)
            experts += layer_experts
            total += c.n_experts * d + layer_experts + shared
        else:
            total += d * gate * c.dense_d_ff + c.dense_d_ff * d
    return total, experts


def _sharded(dense: int, expert: int, c: Any, world_size: int, from_stage: int) -> int:
    """Elements this rank keeps of ``dense`` replicated and ``expert`` (its own experts')
    elements when ZeRO shards that part from stage ``from_stage`` on (rounded up)."""
    if getattr(c, "zero", 0) < from_stage:
        return dense + expert
    return -(-dense // max(world_size, 1)) + -(-expert // max(c.dp, 1))


def estimate(c: Any, world_size: int = 1) -> MemoryEstimate:
    """The peak memory of one rank of a ``dp × ep`` job running run configuration ``c``."""
    params, experts = count_parameters(c)
    dense, expert = params - experts, experts // max(c.ep, 1)
    rows = max(c.batch_size // max(world_size, 1), 1)
    n = rows * c.seq_len  # tokens of one micro-batch on this rank
    d, k = c.d_model, c.top_k
    gate = 2 if c.activation == "swiglu" else 1
    ffn = max(k * (gate + 2) * c.d_ff + 3 * k * d, (gate + 1) * c.dense_d_ff)
    # per block: 2 norms (in, out), qkv, attention out, projection, residuals, router, FFN
    per_layer = n * (8 * d + c.n_experts + ffn)
    probs = rows * c.n_heads * c.seq_len * c.seq_len
    if c.activation_checkpointing:  # one block's activations at a time, block inputs kept
        activations = (c.n_layers * n * d + per_layer) * _F32
        attention = 2 * probs * _F32
    else:
        activations = c.n_layers * per_layer * _F32
        attention = (c.n_layers + 1) * probs * _F32  # saved per layer, + backward's gradient
    return MemoryEstimate(
        parameters=_sharded(dense, expert, c, world_size, 3) * _F32,
        gradients=_sharded(dense, expert, c, world_size, 2) * _F32,
        optimizer=2 * _sharded(dense, expert, c, world_size, 1) * _F32,
        activations=activations,
        attention=attention,
        logits=3 * n * c.vocab_size * _F32,  # logits, softmax, their gradient
    )


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def available_memory() -> tuple[int, str] | None:
    """(bytes this process may still use, where that figure is from): ``MemAvailable`` of
    /proc/meminfo, or the cgroup's limit minus its usage when that is lower; None when the
    platform does not say."""
    found: list[tuple[int, str]] = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append((int(line.split()[1]) * 1024, "MemAvailable in /proc/meminfo"))
    except (OSError, ValueError, IndexError):
        pass
    cgroup = Path(os.environ.get("MOECORE_CGROUP_ROOT", "/sys/fs/cgroup"))
    for limit_file, usage_file in (
        ("memory.max", "memory.current"),  # cgroup v2
        ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes"),  # v1
    ):
        limit, usage = _read_int(cgroup / limit_file), _read_int(cgroup / usage_file)
        if limit is not None and limit < 1 << 60:  # v1 says "no limit" with a huge number
            found.append((max(limit - (usage or 0), 0), f"cgroup limit {cgroup / limit_file}"))
    return min(found) if found else None


def check_memory(c: Any, world_size: int = 1) -> tuple[MemoryEstimate, str | None]:
    """The estimate for run configuration ``c``, and a problem (naming the keys that drive
    it) when it exceeds the memory available — ``memory_limit_gb`` when set, else what
    :func:`available_memory` finds; None when it fits or nothing is known."""
    est = estimate(c, world_size)
    limit_gb = getattr(c, "memory_limit_gb", 0.0)
    if limit_gb > 0:
        available: tuple[int, str] | None = (int(limit_gb * _GIB), "memory_limit_gb")
    else:
        available = available_memory()
    if available is None or est.total <= available[0]:
        return est, None
    biggest = [f"{name} {_fmt(b)} ({keys})" for name, b, keys in est.parts()[:2]]
    return est, (
        f"the estimated peak memory {_fmt(est.total)} per rank exceeds the {_fmt(available[0])} "
        f"available ({available[1]}): mostly {'; '.join(biggest)}. Lower those keys "
        "(or set activation_checkpointing=true), or set memory_limit_gb to the GiB this run "
        "may use if you know better"
    )
