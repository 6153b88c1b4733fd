"""The run configuration: one flat set of keys, from presets, a TOML file and ``--set``
overrides, validated as a whole before anything starts (every problem listed at once)."""

from __future__ import annotations

import dataclasses
import re
import tomllib
import typing
from dataclasses import dataclass, fields
from math import inf, isfinite
from pathlib import Path
from typing import Any

from moecore.data.mixture import data_vocab_size, mixture_from_table, parse_data_spec
from moecore.errors import ConfigError
from moecore.models.config import ModelConfig
from moecore.nn.init import INITS
from moecore.train.optimizers import OPTIMIZERS


@dataclass
class RunConfig(ModelConfig):
    """Every setting of a training run: the model's (inherited from :class:`ModelConfig`),
    then optimizer, schedule, data and checkpoints."""

    # optimizer and schedule ("adamw", "adafactor" or "sgd"; see train/optimizers.py)
    optimizer: str = "adamw"
    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    warmup_steps: int = 50
    schedule: str = "cosine"
    decay_steps: int = 600
    min_lr: float = 1e-4
    clip: float = 1.0
    # adaptive gradient clipping (NFNets): each unit's gradient ≤ agc · max(‖w‖, 1e-3); 0 = off
    agc: float = 0.0
    # training
    steps: int = 600
    batch_size: int = 16
    grad_accum: int = 1
    seed: int = 0
    # compute format: "float32", or "bf16" / "fp16" / "fp8" with float32 master weights and
    # optimizer state (docs/precision.md)
    dtype: str = "float32"
    # fp16's dynamic loss scaling (torch.amp.GradScaler's rules): first scale, and finite
    # steps in a row before it doubles
    loss_scale_init: float = 65536.0
    loss_scale_growth_interval: int = 2000
    # "hpts": the router's and the residual projections' formats follow their gradient norm
    # each step (fp16 < t/2 ≤ bf16 < t ≤ float32, t = hpts_threshold); "none": fixed
    precision_schedule: str = "none"
    hpts_threshold: float = 0.1
    eval_every: int = 100
    eval_batches: int = 4
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    max_bad_steps: int = 5
    spike_factor: float = 3.0
    # write each step's parameter checksums (float64 sum and sum of squares of every tensor,
    # after the update) into metrics.jsonl: how tests prove that an N-rank run equals its
    # reference run
    param_checksum: bool = False
    # what a loss spike (loss > spike_factor × its moving average) does: "skip" the update
    # or only "flag" it in the metrics
    spike_action: str = "skip"
    # keep freed activation/gradient pages mapped for the next step (glibc malloc tuning)
    keep_freed_memory: bool = True
    # data: "" (the built-in corpus), a text file or folder, a .bin/.npy of uint16 ids
    # (needs vocab), a `moecore prepare` folder, or a mixture "0.7:DIR_A,0.3:DIR_B" (in TOML
    # also a table of path = weight); vocab_size defaults to the prepared data's vocabulary
    data: str = ""
    vocab: int = 0
    # check the SHA-256 of every prepared shard before training (reads each file once)
    data_verify: bool = True
    # distributed (``mpiexec -n dp·ep moecore train --dp dp --ep ep``): data-parallel ranks,
    # expert-parallel ranks (the experts of each MoE layer split over ep ranks), gradient
    # compression ("none" or "topk:<ratio>"), and the communication scheduler's settings
    dp: int = 1
    ep: int = 1
    compress: str = "none"
    compress_warmup: int = 0
    bucket_mb: float = 25.0
    comm_policy: str = "fifo"
    # what uncompressed gradient buckets cross the network as: "float32", or "bf16" (half
    # the bytes, summed in float32 at each step of the all-reduce); see docs/distributed.md
    grad_wire_dtype: str = "float32"
    # ZeRO stage over the data-parallel ranks: 0 off, 1 optimizer state sharded, 2 also
    # gradients (reduce-scattered during backward), 3 also parameters (gathered per block
    # as it runs); see docs/zero.md
    zero: int = 0
    ranks_per_node: int = 1
    # pipeline parallel (``mpiexec -n pp·dp moecore train --pp pp --dp dp``): pipeline ranks,
    # the schedule ("gpipe", "1f1b", "interleaved", "dualpipe"), model chunks per rank of the
    # interleaved schedule, and how layers are cut into stages ("uniform" or "profile": by
    # each layer's measured time); a step's micro-batches are its grad_accum
    pp: int = 1
    pp_schedule: str = "1f1b"
    virtual_stages: int = 2
    pp_balance: str = "uniform"
    # seconds any blocking communication may last before the job ends (a rank that hangs)
    comm_timeout_s: float = 1800.0
    # GiB a rank may use (0: what the machine has free, MemAvailable or the cgroup limit);
    # a run whose estimated peak exceeds it is refused before the first step
    memory_limit_gb: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """The configuration as a plain dict (for JSON and TOML)."""
        return dataclasses.asdict(self)


PRESETS: dict[str, dict[str, Any]] = {
    # The README's default run: 4 layers of 8 experts, top-2, on the built-in corpus.
    "moe-small": {},
    # 32 experts, top-2, λ = 0.01: experts half as wide as moe-small's so a step costs about
    # the same (18.0 M parameters, 2.27 M active per token; docs/recipe.md).
    "moe-32": {"n_experts": 32, "top_k": 2, "aux_loss": 0.01, "d_ff": 256},
    # A few seconds on a laptop: for tests and smoke runs.
    "moe-tiny": {
        "d_model": 64,
        "n_layers": 2,
        "n_heads": 2,
        "seq_len": 64,
        "n_experts": 4,
        "d_ff": 64,
        "dense_d_ff": 128,
        "batch_size": 4,
        "steps": 20,
        "warmup_steps": 5,
        "decay_steps": 20,
        "eval_every": 10,
        "eval_batches": 2,
        "checkpoint_every": 10,
    },
}

#: The DeepSeek-V3 architecture at small scale (docs/deepseek.md): MLA, fine-grained routed
#: experts with a shared one, sigmoid scores, aux-loss-free balancing plus the sequence-wise
#: loss, node-limited routing, one MTP module.
_DEEPSEEK = {
    "norm": "rmsnorm",
    "position": "rope",
    "attention": "mla",
    "score": "sigmoid",
    "aux_loss": 0.0,
    "seq_aux_loss": 1e-4,
    "bias_update_rate": 1e-3,
    "routed_scale": 2.5,
    "n_shared_experts": 1,
    "mtp_depth": 1,
    "mtp_weight": 0.3,
}
PRESETS["deepseek-small"] = {
    **_DEEPSEEK,
    # about as many training FLOPs per token as moe-small, about half its tokens/s on this
    # CPU: 120 steps of 16 × 256 tokens, ~10 minutes on an idle 2-core Zen 3
    "steps": 120,
    "warmup_steps": 12,
    "decay_steps": 120,
    "eval_every": 40,
    "checkpoint_every": 40,
    # 8 experts of 512 split 4 ways: 32 routed experts of 128, top-4, 4 groups (top-2)
    "n_experts": 8,
    "expert_split": 4,
    "top_k": 1,
    "d_ff": 512,
    "n_groups": 4,
    "topk_groups": 2,
    "kv_lora_rank": 64,
    "q_lora_rank": 128,
    "rope_head_dim": 32,
}
PRESETS["deepseek-tiny"] = {
    **PRESETS["moe-tiny"],
    **_DEEPSEEK,
    # 4 experts of 64 split 2 ways: 8 routed experts of 32, top-2, 4 groups (top-2)
    "n_experts": 4,
    "expert_split": 2,
    "top_k": 1,
    "n_groups": 4,
    "topk_groups": 2,
    "kv_lora_rank": 16,
    "q_lora_rank": 24,
    "rope_head_dim": 8,
    "batch_size": 4,
}

_TYPES: dict[str, type] = {
    f.name: typing.get_type_hints(RunConfig)[f.name] for f in fields(RunConfig)
}
_CHOICES = {
    "activation": ("gelu", "swiglu", "relu"),
    "score": ("softmax", "sigmoid"),
    "norm": ("layernorm", "rmsnorm"),
    "position": ("learned", "rope"),
    "schedule": ("cosine", "linear", "constant"),
    "dtype": ("float32", "bf16", "fp16", "fp8"),
    "precision_schedule": ("none", "hpts"),
    "comm_policy": ("fifo", "priority"),
    "grad_wire_dtype": ("float32", "bf16"),
    "init": INITS,
    "optimizer": OPTIMIZERS,
    "spike_action": ("skip", "flag"),
    "attention": ("mha", "mla"),
    "attention_gate": ("none", "dao"),
    "pp_schedule": ("gpipe", "1f1b", "interleaved", "dualpipe"),
    "pp_balance": ("uniform", "profile"),
}


#: Float keys for which ``inf`` makes sense ("no limit").
_UNBOUNDED = ("comm_timeout_s", "memory_limit_gb")


def _coerce(key: str, value: Any, problems: list[str]) -> Any:
    kind = _TYPES[key]
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
    elif kind is float:
        number = None
        if isinstance(value, int | float | str) and not isinstance(value, bool):
            try:
                number = float(value)
            except (ValueError, OverflowError):  # OverflowError: an int beyond 1e308
                pass
        # NaN passes every "≥ 0" check and then poisons training; ∞ means "no limit" only
        # for limits.
        if number is not None and (isfinite(number) or (key in _UNBOUNDED and number == inf)):
            return number
        if number is not None:
            problems.append(f"{key}: expected a finite number, got {value!r}")
            return None
    elif kind is str:
        if isinstance(value, str):
            return value
        if key == "data" and isinstance(value, dict):  # a mixture table of path = weight
            try:
                return mixture_from_table(value)
            except ValueError as exc:
                problems.append(f"data: {exc}")
                return None
    problems.append(f"{key}: expected {kind.__name__}, got {value!r}")
    return None


def _check_values(c: RunConfig) -> list[str]:
    p: list[str] = []
    positive = [
        "vocab_size",
        "d_model",
        "n_layers",
        "n_heads",
        "seq_len",
        "n_experts",
        "top_k",
        "d_ff",
        "dense_d_ff",
        "moe_every",
        "steps",
        "batch_size",
        "grad_accum",
        "eval_batches",
        "keep_checkpoints",
        "max_bad_steps",
        "dp",
        "ep",
        "ranks_per_node",
        "expert_split",
        "pp",
        "virtual_stages",
    ]
    for key in positive:
        if getattr(c, key) < 1:
            p.append(f"{key} must be ≥ 1, got {getattr(c, key)}")
    for key in (
        "eval_every",
        "checkpoint_every",
        "warmup_steps",
        "decay_steps",
        "first_dense_layers",
        "n_shared_experts",
        "vocab",
        "seed",
        "compress_warmup",
        "memory_limit_gb",
        "n_groups",
        "topk_groups",
        "mtp_depth",
        "q_lora_rank",
        "seq_aux_loss",
        "mtp_weight",
    ):
        if getattr(c, key) < 0:
            p.append(f"{key} must be ≥ 0, got {getattr(c, key)}")
    for key, options in _CHOICES.items():
        if getattr(c, key) not in options:
            p.append(f"{key} must be one of {list(options)}, got {getattr(c, key)!r}")
    if c.n_heads >= 1 and c.d_model % c.n_heads:
        p.append(f"n_heads ({c.n_heads}) must divide d_model ({c.d_model})")
    elif c.position == "rope" and (c.d_model // max(c.n_heads, 1)) % 2:
        p.append("position 'rope' needs an even head dimension (d_model / n_heads)")
    if c.top_k > c.n_experts:
        p.append(f"top_k ({c.top_k}) must not exceed n_experts ({c.n_experts})")
    p.extend(_check_deepseek(c))
    for key in (
        "lr",
        "min_lr",
        "weight_decay",
        "aux_loss",
        "z_loss",
        "bias_update_rate",
        "capacity_factor",
        "agc",
    ):
        if getattr(c, key) < 0:
            p.append(f"{key} must be ≥ 0, got {getattr(c, key)}")
    for key in ("beta1", "beta2", "dropout"):
        if not 0 <= getattr(c, key) < 1:
            p.append(f"{key} must be in [0, 1), got {getattr(c, key)}")
    p.extend(_check_precision(c))
    if c.eps <= 0 or c.clip <= 0 or c.spike_factor <= 1:
        p.append(
            f"eps and clip must be > 0 and spike_factor > 1, got {c.eps}, {c.clip}, {c.spike_factor}"
        )
    if c.min_lr > c.lr:
        p.append(f"min_lr ({c.min_lr}) must not exceed lr ({c.lr})")
    if c.first_dense_layers > c.n_layers:
        p.append(f"first_dense_layers ({c.first_dense_layers}) exceeds n_layers ({c.n_layers})")
    if c.dp >= 1 and c.ep >= 1 and c.batch_size % (c.dp * c.ep):
        what = f"dp ({c.dp})" if c.ep == 1 else f"dp × ep ({c.dp} × {c.ep})"
        p.append(f"batch_size ({c.batch_size}) must be a multiple of {what}")
    if c.ep > 1:
        p.extend(_check_expert_parallel(c))
    if c.pp > 1:
        p.extend(_check_pipeline(c))
    if c.dp >= 1 and c.ranks_per_node >= 1 and c.dp % c.ranks_per_node:
        p.append(f"ranks_per_node ({c.ranks_per_node}) must divide dp ({c.dp})")
    if not c.bucket_mb > 0:
        p.append(f"bucket_mb must be > 0, got {c.bucket_mb}")
    if not c.comm_timeout_s > 0:
        p.append(f"comm_timeout_s must be > 0, got {c.comm_timeout_s}")
    if c.compress != "none":
        m = re.fullmatch(r"topk:([0-9.eE+-]+)", c.compress)
        try:
            ratio = float(m.group(1)) if m else -1.0
        except ValueError:
            ratio = -1.0
        if not 0 < ratio <= 1:
            p.append(f"compress must be 'none' or 'topk:<ratio in (0, 1]>', got {c.compress!r}")
    p.extend(_check_zero(c))
    p.extend(_check_grad_wire(c))
    if c.data.endswith((".bin", ".npy")) and c.vocab < 1:
        p.append(f"data {c.data} holds token ids: set vocab to the vocabulary size")
    try:
        parse_data_spec(c.data)
    except ValueError as exc:
        p.append(f"data {c.data!r}: {exc}")
    return p


def _check_deepseek(c: RunConfig) -> list[str]:
    """Fine-grained experts, node-limited routing, MLA, MTP (docs/deepseek.md)."""
    p = []
    m = max(c.expert_split, 1)
    if c.d_ff % m:
        p.append(f"expert_split ({c.expert_split}) must divide d_ff ({c.d_ff})")
    if not c.routed_scale > 0:
        p.append(f"routed_scale must be > 0, got {c.routed_scale}")
    experts, top_k = c.n_experts * m, c.top_k * m
    if bool(c.n_groups) != bool(c.topk_groups):
        p.append("n_groups and topk_groups go together (both 0 or both ≥ 1)")
    elif c.n_groups >= 1:
        if experts % c.n_groups:
            p.append(
                f"n_groups ({c.n_groups}) must divide the routed experts "
                f"(n_experts × expert_split = {experts})"
            )
        elif c.topk_groups > c.n_groups:
            p.append(f"topk_groups ({c.topk_groups}) must not exceed n_groups ({c.n_groups})")
        elif c.topk_groups * (experts // c.n_groups) < top_k:
            p.append(
                f"topk_groups ({c.topk_groups}) groups of {experts // c.n_groups} experts "
                f"cannot hold top_k × expert_split = {top_k} experts per token"
            )
        if c.ep > 1 and c.n_groups % c.ep:
            p.append(
                f"n_groups ({c.n_groups}) must be a multiple of ep ({c.ep}): a group of "
                "experts has to live on one expert-parallel rank"
            )
    if c.attention == "mla":
        if not 1 <= c.kv_lora_rank < c.d_model:
            p.append(f"kv_lora_rank must be in [1, d_model={c.d_model}), got {c.kv_lora_rank}")
        if c.q_lora_rank >= c.d_model:
            p.append(f"q_lora_rank must be < d_model ({c.d_model}), got {c.q_lora_rank}")
        if c.rope_head_dim < 2 or c.rope_head_dim % 2:
            p.append(f"rope_head_dim must be even and ≥ 2 with MLA, got {c.rope_head_dim}")
        if c.position != "rope":
            p.append("attention 'mla' carries its own decoupled RoPE: set position = 'rope'")
        if c.bias:
            p.append("bias with attention 'mla' is not supported (its projections have none)")
    if c.mtp_depth >= c.seq_len:
        p.append(f"mtp_depth ({c.mtp_depth}) must be < seq_len ({c.seq_len})")
    return p


def _check_grad_wire(c: RunConfig) -> list[str]:
    """The bf16 wire format is for the all-reduce of uncompressed buckets only."""
    if c.grad_wire_dtype == "float32":
        return []
    why = {
        "compress": (c.compress != "none", "compressed buckets have their own wire format"),
        "zero": (c.zero >= 2, "stages 2 and 3 reduce-scatter the gradients in float32"),
        "pp": (c.pp > 1, "the pipeline step sums the gradients itself, in float32"),
        "ranks_per_node": (
            c.ranks_per_node > 1,
            "the two-level all-reduce sums in float32 (not implemented for bf16)",
        ),
    }
    return [
        f"grad_wire_dtype {c.grad_wire_dtype!r} with {key} ({getattr(c, key)}) is not "
        f"supported: {reason}"
        for key, (clash, reason) in why.items()
        if clash
    ]


def _check_zero(c: RunConfig) -> list[str]:
    """ZeRO stages and what they cannot be combined with (refused rather than different)."""
    if c.zero not in (0, 1, 2, 3):
        return [f"zero must be 0, 1, 2 or 3, got {c.zero!r}"]
    if not c.zero:
        return []
    p = []
    if c.zero >= 2 and c.compress != "none":
        p.append(
            f"compress ({c.compress}) with zero={c.zero} is not supported: stage 2 "
            "reduce-scatters the gradients, compression composes with zero=1 only"
        )
    if c.optimizer == "adafactor":
        p.append(
            f"optimizer adafactor with zero={c.zero} is not supported: its factored second "
            "moment needs whole matrices, ZeRO shards them (use adamw or sgd)"
        )
    if c.agc:
        p.append(
            f"agc ({c.agc}) with zero={c.zero} is not supported: adaptive clipping needs "
            "each unit's whole gradient, ZeRO shards it"
        )
    # Tried after merging [precision] and [zero]: stage 3 gathers float32 masters inside the
    # low-precision step (its first loss differs from plain DP's in bf16), and fp16's loss
    # scaler unscales whole gradients, which stage 2 has already reduce-scattered away (the
    # logged gradient norm stayed multiplied by the scale).
    if c.zero == 3 and c.dtype != "float32":
        p.append(
            f"dtype {c.dtype!r} with zero=3 is not supported yet: stage 3 gathers the float32 "
            "masters, not the compute copies (use zero=2, or dtype float32)"
        )
    elif c.zero >= 2 and c.dtype == "fp16":
        p.append(
            f"dtype 'fp16' with zero={c.zero} is not supported yet: the loss scaler unscales "
            "whole gradients and stage 2 keeps only this rank's part (use zero=1, or bf16)"
        )
    return p


def _check_precision(c: RunConfig) -> list[str]:
    """The loss scaler's settings (used under ``dtype = "fp16"``)."""
    p = []
    if not c.loss_scale_init > 0:
        p.append(f"loss_scale_init must be > 0, got {c.loss_scale_init}")
    if c.loss_scale_growth_interval < 1:
        p.append(f"loss_scale_growth_interval must be ≥ 1, got {c.loss_scale_growth_interval}")
    if not c.hpts_threshold > 0:
        p.append(f"hpts_threshold must be > 0, got {c.hpts_threshold}")
    return p


def _check_expert_parallel(c: RunConfig) -> list[str]:
    """What expert parallelism (ep > 1) cannot do exactly: refused rather than different."""
    p = []
    if c.n_experts >= 1 and c.n_experts * max(c.expert_split, 1) % c.ep:
        split = f" × expert_split ({c.expert_split})" if c.expert_split > 1 else ""
        p.append(f"ep ({c.ep}) must divide n_experts ({c.n_experts}){split}")
    if c.capacity_factor:
        p.append(
            f"capacity_factor ({c.capacity_factor}) with ep ({c.ep}) > 1 is not supported: "
            "expert parallelism is dropless (set capacity_factor=0)"
        )
    if c.bias:
        p.append(f"bias with ep ({c.ep}) > 1 is not supported (expert biases are not sharded)")
    if c.ranks_per_node > 1:
        p.append(
            f"ranks_per_node ({c.ranks_per_node}) with ep ({c.ep}) > 1 is not supported "
            "(hierarchical all-reduce is for pure data parallelism)"
        )
    return p


def _check_pipeline(c: RunConfig) -> list[str]:
    """What the pipeline engine needs (the schedule's own sizes are checked in Rust)."""
    p = []
    if c.dropout:
        p.append(
            f"dropout ({c.dropout}) with pp ({c.pp}) > 1 is not supported: the stages would "
            "draw the random masks in another order than one process"
        )
    if c.ranks_per_node > 1:
        p.append(f"ranks_per_node ({c.ranks_per_node}) with pp ({c.pp}) > 1 is not supported")
    # Combinations the pipeline step does not implement yet: refused, never silently different.
    if c.zero:
        p.append(
            f"zero ({c.zero}) with pp ({c.pp}) > 1 is not supported: the pipeline step sums "
            "whole gradients over stages and replicas itself (use zero = 0)"
        )
    if c.dtype != "float32":
        p.append(
            f"dtype {c.dtype!r} with pp ({c.pp}) > 1 is not supported yet: the pipeline "
            "stages run in float32 (use dtype = 'float32')"
        )
    if c.optimizer == "adafactor":
        p.append(
            f"optimizer adafactor with pp ({c.pp}) > 1 is not supported: its factored second "
            "moments do not fit the per-element checkpoint pieces each stage writes"
        )
    if c.pp_schedule == "interleaved" and (c.virtual_stages < 2 or c.grad_accum % c.pp):
        p.append(
            f"pp_schedule 'interleaved' needs virtual_stages >= 2 and grad_accum (micro-batches, "
            f"{c.grad_accum}) a multiple of pp ({c.pp})"
        )
    if c.pp_schedule == "dualpipe" and (c.pp % 2 or c.grad_accum % 2 or c.grad_accum < 2 * c.pp):
        p.append(
            f"pp_schedule 'dualpipe' needs an even pp and an even grad_accum (micro-batches) "
            f">= 2 x pp, got pp {c.pp} and grad_accum {c.grad_accum}"
        )
    return p


def parse_overrides(pairs: list[str]) -> dict[str, str]:
    """``["steps=50", "lr=3e-4"]`` → ``{"steps": "50", "lr": "3e-4"}``."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError([f"--set expects key=value, got {pair!r}"])
        out[key.strip()] = value.strip()
    return out


def build_config(
    preset: str | None = "moe-small",
    file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> RunConfig:
    """Preset, then TOML file, then overrides; raises :class:`ConfigError` listing every
    unknown key, wrong type and impossible value."""
    problems: list[str] = []
    values: dict[str, Any] = {}
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError([f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}"])
        values.update(PRESETS[preset])
    layers: list[tuple[str, dict[str, Any]]] = []
    if file is not None:
        try:
            with open(file, "rb") as fh:
                loaded = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError([f"config file {file} does not exist"]) from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError([f"config file {file} is not valid TOML: {exc}"]) from None
        flat: dict[str, Any] = {}
        for key, value in loaded.items():
            if key == "data" and isinstance(value, dict) and not set(value) & set(_TYPES):
                flat["data"] = value  # [data] of path = weight: a mixture, not a section
            elif isinstance(value, dict):
                # Sections ([model], [train] …) are allowed for readability; keys stay flat.
                flat.update(value)
            else:
                flat[key] = value
        layers.append((str(file), flat))
    if overrides:
        layers.append(("--set", dict(overrides)))
    for source, entries in layers:
        for key, value in entries.items():
            if key not in _TYPES:
                problems.append(f"unknown key {key!r} (from {source})")
                continue
            coerced = _coerce(key, value, problems)
            if coerced is not None:
                values[key] = coerced
    chosen = {key for _, entries in layers for key in entries}
    if "vocab_size" not in chosen and values.get("data"):
        # Prepared data says its vocabulary; the model takes it unless told otherwise.
        vocab = data_vocab_size(str(values["data"]))
        if vocab is not None:
            values["vocab_size"] = vocab
    config = RunConfig(**values)
    problems.extend(_check_values(config))
    if problems:
        raise ConfigError(problems)
    return config


def config_from_dict(values: dict[str, Any]) -> RunConfig:
    """A validated RunConfig from a saved dict (e.g. a checkpoint's)."""
    return build_config(preset=None, overrides=values)
