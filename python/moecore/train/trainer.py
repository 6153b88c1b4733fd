"""``Trainer``: trains a :class:`MoETransformer` from a :class:`RunConfig`, with evaluation,
metrics, anomaly detection, checkpoints and bit-exact resumption."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np

import moecore
from moecore import nn, optim
from moecore.autograd.random import get_rng_state, set_rng_state
from moecore.data import Corpus, Mixture, as_mixture, load_data
from moecore.distributed import (
    Group,
    HierarchicalGroup,
    MPIGroup,
    SingleProcess,
    init,
    world_size_from_env,
)
from moecore.distributed.agreement import check_ranks_agree
from moecore.models import ModelConfig, MoETransformer
from moecore.models.transformer import Block
from moecore.nn.moe import routing_summary
from moecore.train import checkpoint, sharded_checkpoint
from moecore.train.checkpoint import CheckpointError
from moecore.train.checksum import param_checksums
from moecore.train.config import ConfigError, RunConfig, config_from_dict
from moecore.train.memory import keep_freed_memory
from moecore.train.metrics import MetricsLog
from moecore.train.monitor import Monitor
from moecore.train.optimizers import make_optimizer
from moecore.train.parallel import Layout
from moecore.train.pipeline import PipelineStep
from moecore.train.precision import RunPrecision
from moecore.train.preemption import StopRequest
from moecore.train.preflight import check_memory
from moecore.train.progress import Progress
from moecore.train.recovery import ResumeReport
from moecore.train.routing_metrics import RoutingTotals
from moecore.train.rss import rss_record


@dataclass
class TrainResult:
    """What a call to :meth:`Trainer.train` did."""

    steps_done: int
    #: Steps this call ran: 0 when a resumed run had already reached ``config.steps``
    #: (``final_loss`` is then NaN: no step was taken to measure it).
    steps_run: int
    final_loss: float
    val_loss: float | None
    interrupted: bool
    seconds: float
    run_dir: Path
    #: Set when SIGTERM/SIGUSR1 stopped the run (after a checkpoint): what was received.
    preempted_by: str | None = None


def build_model(config: RunConfig) -> MoETransformer:
    """The model of a run, initialised from the run's seed."""
    moecore.manual_seed(config.seed)
    return MoETransformer(ModelConfig.from_run(config))


def build_optimizer(model: nn.Module, config: RunConfig) -> optim.Optimizer:
    """The run's optimizer (``config.optimizer``, AdamW by default), with weight decay on
    matrices only (not on norms and biases), as GPT-2 does."""
    return make_optimizer(model, config)


def _world(config: RunConfig) -> Group:
    """The job's group: MPI when dp · ep · pp > 1 (under mpiexec; hierarchical all-reduce
    when ranks_per_node > 1), else this process alone."""
    # Under mpiexec -n N > 1 the world is MPI even if the config says one rank: a rank whose
    # settings differ from the others' is then refused (with the others) instead of
    # training alone while they wait for it.
    if config.dp * config.ep * config.pp == 1 and (world_size_from_env() or 1) <= 1:
        return SingleProcess()
    world = init(timeout=config.comm_timeout_s)
    if config.ranks_per_node > 1 and isinstance(world, MPIGroup) and world.size == config.dp:
        return HierarchicalGroup(world, config.ranks_per_node)
    return world


#: Settings each rank may have its own of: where its copy of the data is, its memory tuning,
#: how long it waits for the others.
_RANK_LOCAL = ("data", "keep_freed_memory", "comm_timeout_s", "memory_limit_gb")


def _check_same_config(group: Group, config: RunConfig) -> None:
    """A ``ConfigError`` on every rank unless all ranks run the same configuration (but for
    :data:`_RANK_LOCAL`): another ``lr`` on one rank would make the replicas drift apart
    silently, another ``eval_every`` would leave the others waiting in a collective."""
    shared = {k: v for k, v in config.to_dict().items() if k not in _RANK_LOCAL}
    why = "so they would not train the same model"
    try:
        check_ranks_agree(group, "moecore train", [], shared, why=why)
    except ValueError as exc:
        raise ConfigError([str(exc)]) from None


class _NoMetrics:
    """What ranks other than 0 log to: nothing."""

    offset = 0

    def write(self, record: dict[str, Any]) -> None:
        """Drops ``record``."""

    def sync(self) -> None:
        """Nothing to flush."""

    def close(self) -> None:
        """Nothing to close."""


class Trainer:
    """Runs the training loop of a run directory.

    Args:
        config: the run configuration (validated).
        run_dir: where metrics and checkpoints go (created).
        corpus: the data (a corpus or a mixture); loaded from ``config.data`` when None.
        out: where progress goes (a terminal gets one live line).
    """

    def __init__(
        self,
        config: RunConfig,
        run_dir: Path,
        corpus: Corpus | Mixture | None = None,
        out: TextIO | None = None,
        group: Group | None = None,
    ) -> None:
        self.config = config
        if config.keep_freed_memory:
            keep_freed_memory()
        self.run_dir = Path(run_dir)
        self.group = group if group is not None else _world(config)
        # Settings first: a rank launched with another pp (or dp, ep) is named on every rank.
        _check_same_config(self.group, config)
        if self.group.size != config.dp * config.ep * config.pp:
            what = f"dp is {config.dp}" if config.ep == 1 else f"dp × ep is {config.dp * config.ep}"
            if config.pp > 1:
                what = f"pp × dp × ep is {config.pp * config.dp * config.ep}"
            raise ConfigError([f"{what} but the job has {self.group.size} ranks (mpiexec -n)"])
        self.memory, problem = check_memory(config, self.group.size)
        if problem is not None:
            raise ConfigError([problem])
        # Only rank 0 shows progress and writes files.
        self.out = (out or sys.stdout) if self.group.is_root else open(os.devnull, "w")
        self.data = (
            as_mixture(corpus)
            if corpus is not None
            else load_data(config.data, config.vocab or None, config.data_verify)
        )
        #: The first (usually only) source of the data.
        self.corpus = self.data.corpora[0]
        if self.data.vocab_size > config.vocab_size:
            raise ConfigError(
                [
                    f"vocab_size ({config.vocab_size}) is smaller than the data's vocabulary "
                    f"({self.data.vocab_size}): drop the setting or raise it"
                ]
            )
        self.data.check_length(config.seq_len)
        self.model = build_model(config)
        # Expert parallel: each MoE layer keeps this rank's experts; then gradient averaging.
        # Pipeline parallel: gradients are summed by train/pipeline.py, not by the layout.
        self.pipeline: PipelineStep | None = None
        if config.pp > 1:
            sample, _ = self.data.train_batch(config.seq_len, config.batch_size, config.seed, 0, 0)
            rows = config.batch_size // (config.dp * config.ep)
            self.pipeline = PipelineStep(self.model, config, self.group, sample[:rows])
        if self.pipeline is None:
            self.layout = Layout(self.group, config.ep, config.zero)
        else:
            self.layout = Layout(self.pipeline.stage_world, config.ep, reduce_gradients=False)
        self.layout.shard_model(self.model)
        self._data_parallel(warmup_steps=config.compress_warmup)
        self.moe_layers = self.layout.moe_layers(self.model)
        #: Experts of every MoE layer of the whole model (pipeline ranks hold some layers).
        self.moe_experts = (
            self.pipeline.params.moe_experts
            if self.pipeline is not None
            else [layer.n_experts for layer in self.moe_layers]
        )
        for layer in self.moe_layers:
            # Micro-batch losses are divided by grad_accum: so are the aux-loss gradients
            # the MoE op injects in backward.
            layer.aux_loss_scale = 1.0 / config.grad_accum
        #: ``config.dtype``: compute copies, rounded activations, fp16's loss scale.
        self.precision = RunPrecision(self.model, config, residual=(Block,))
        # With ZeRO, each rank updates its own part of the (float32 master) parameters.
        self.optimizer = self.layout.shard_optimizer(build_optimizer(self.model, config))
        self.schedule = optim.LRScheduler(
            self.optimizer,
            config.schedule,
            warmup=config.warmup_steps,
            total=config.decay_steps,
            min_lr=config.min_lr,
        )
        self.monitor = Monitor(
            config.spike_factor, config.max_bad_steps, skip_spikes=config.spike_action == "skip"
        )
        self.step = 0
        self._metrics_offset: int | None = None
        self._val = self.data.val_batches(config.seq_len, config.batch_size, config.eval_batches)
        self.last_val: float | None = None
        self.stop = StopRequest()
        #: Set by :meth:`resume`: the checkpoint used and the damaged ones skipped.
        self.resumed_from: ResumeReport | None = None

    def _save_tokenizer(self) -> None:
        """A copy of the data's ``tokenizer.json`` in the run, for ``moecore generate``."""
        source = self.corpus.folder
        if source is not None and (self.data.tokenizer or {}).get("kind") == "tokenizers":
            copy = self.run_dir / "tokenizer.json"
            copy.write_bytes((source / "tokenizer.json").read_bytes())

    def _data_parallel(self, warmup_steps: int) -> None:
        self.layout.data_parallel(
            self.model,
            bucket_mb=self.config.bucket_mb,
            policy=self.config.comm_policy,
            compress=self.config.compress,
            warmup_steps=warmup_steps,
            # The trainer never keeps a gradient across steps, so the copy is not needed.
            gradient_as_bucket_view=True,
            timeout=self.config.comm_timeout_s,
            wire_dtype={"bf16": "bfloat16"}.get(self.config.grad_wire_dtype, "float32"),
        )

    # -- persistence ---------------------------------------------------------------------
    @classmethod
    def resume(
        cls, run_dir: Path, out: TextIO | None = None, overrides: dict[str, Any] | None = None
    ) -> Trainer:
        """A trainer continuing the newest checkpoint of ``run_dir`` exactly where it was."""
        notes: list[str] = []
        # lazy: a rank resuming a sharded checkpoint reads only its part of the optimizer state.
        used, groups, state, damaged = checkpoint.newest_intact(run_dir, notes, lazy=True)
        values = dict(state["config"])
        values.update(overrides or {})
        trainer = cls(config_from_dict(values), run_dir, out=out)
        try:
            trainer._restore(groups, state)
        except (KeyError, IndexError, TypeError, ValueError, AttributeError, OverflowError) as exc:
            raise CheckpointError(f"{used / 'state.json'}: corrupt ({exc!r})") from None
        # A rank that found another checkpoint intact (its own copy of the run) would
        # continue another step: refused on every rank.
        try:
            check_ranks_agree(trainer.group, "moecore train --resume", [], {"from": used.name})
        except ValueError as exc:
            raise CheckpointError(str(exc)) from None
        trainer.resumed_from = ResumeReport(used, damaged, notes)
        if trainer.group.is_root:
            trainer.resumed_from.warn()
        return trainer

    def _param_names(self) -> list[str]:
        """Model parameter names in the optimizer's numbering."""
        names = {id(p): n for n, p in self.model.named_parameters()}
        return [names[id(p)] for group in self.optimizer.param_groups for p in group["params"]]

    def _restore(self, groups: dict[str, dict[str, np.ndarray]], state: dict[str, Any]) -> None:
        cfg = self.config
        if self.group.size > 1 and cfg.compress != "none" and cfg.compress_warmup:
            # The dense warm-up counts from the run's first step, not from this resume. (The
            # error-feedback residuals restart at zero: they are per rank and per bucket
            # layout, a checkpoint is neither; see the README.) Before the optimizer state
            # is loaded: under ZeRO the optimizer follows the new buckets' shards.
            self._data_parallel(warmup_steps=max(0, cfg.compress_warmup - int(state["step"])))
            self.optimizer = self.layout.shard_optimizer(self.optimizer)
        # Checkpoints hold every expert (single-process layout): keep this rank's.
        lay = self.layout
        model_state = groups["model"]
        if self.pipeline is not None:  # this rank's stages only
            model_state = {n: v for n, v in model_state.items() if self.pipeline.params.holds(n)}
        with lay.full_params(writeback=True):
            self.model.load_state_dict(
                {n: lay.shard(n, v) for n, v in model_state.items()}, strict=True
            )
        names = self._param_names()
        # The checkpoint numbers the parameters as one process's optimizer does; a pipeline
        # rank's optimizer has only its own, numbered among themselves.
        saved_names = self.pipeline.params.param_names if self.pipeline is not None else names
        local = {n: i for i, n in enumerate(names)}

        def renumber(index: int) -> int | None:
            if index >= len(saved_names):
                return index  # refused by load_state_dict, naming it
            return local.get(saved_names[index])

        saved_groups = [
            {**g, "params": [j for i in g["params"] if (j := renumber(i)) is not None]}
            for g in state["optimizer"]["param_groups"]
        ]
        saved_opt: dict[str, Any] = {"state": {}, "param_groups": saved_groups}
        for key, value in groups.get("optimizer", {}).items():
            index, name = key.split(".", 1)
            if (i := renumber(int(index))) is None:
                continue
            if i < len(names):
                value = lay.shard(names[i], value)
            saved_opt["state"].setdefault(i, {})[name] = value
        for index, scalars in state["optimizer"]["scalars"].items():
            if (i := renumber(int(index))) is not None:
                saved_opt["state"].setdefault(i, {}).update(scalars)
        if self.pipeline is not None and len(saved_groups) > len(self.optimizer.param_groups):
            saved_opt["param_groups"] = [g for g in saved_groups if g["params"]]
        self.optimizer.load_state_dict(saved_opt)
        self.schedule.load_state_dict(state["schedule"])
        self.monitor.load_state_dict(state["monitor"])
        self.precision.load_state_dict(state.get("precision", {}))
        saved_loads = state.get("moe_load", [])
        for i, layer in self._moe_indexed():
            if i < len(saved_loads):
                layer._load_since_update[...] = saved_loads[i]
        set_rng_state(state["rng"])
        self.step = int(state["step"])
        self._metrics_offset = int(state["metrics_offset"])
        self.last_val = state.get("last_val")

    def save_checkpoint(self, metrics: MetricsLog) -> Path | None:
        """Writes a checkpoint of the current step (atomically): every rank must call it
        (expert shards are gathered), rank 0 writes (None on the others). The checkpoint
        has the single-process layout whatever ``dp`` and ``ep`` are — or, under ZeRO,
        every rank writes its own part (:mod:`moecore.train.sharded_checkpoint`), read back
        in the single-process layout."""
        lay = self.layout
        names = self._param_names()
        if lay.sharded_checkpoints() or self.pipeline is not None:
            return self._save_sharded(metrics, names)
        model_state = {n: lay.gather(n, v) for n, v in self.model.state_dict().items()}
        opt_state = self.optimizer.state_dict()
        tensors: dict[str, np.ndarray] = {}
        scalars: dict[str, Any] = {}
        for index, entry in opt_state["state"].items():
            for name, value in entry.items():
                if isinstance(value, np.ndarray):
                    tensors[f"{index}.{name}"] = lay.gather(names[index], value)
                else:
                    scalars.setdefault(str(index), {})[name] = value
        if not self.group.is_root:
            return None
        metrics.sync()
        groups = [{k: v for k, v in g.items()} for g in opt_state["param_groups"]]
        return checkpoint.save(
            self.run_dir,
            self.step,
            {"model": model_state, "optimizer": tensors},
            self._checkpoint_state(metrics, groups, scalars),
            self.config.keep_checkpoints,
        )

    def _save_sharded(self, metrics: MetricsLog, names: list[str]) -> Path | None:
        extra: dict[str, Any] = {}
        if self.pipeline is not None:
            owned, layout, groups, extra = self._pipeline_pieces()
        else:
            owned, layout, groups = self._zero_pieces(names)
        if self.group.is_root:
            metrics.sync()
        return sharded_checkpoint.save_sharded(
            self.run_dir,
            self.step,
            self.group,
            owned,
            layout,
            {**self._checkpoint_state(metrics, groups, {}), **extra},
            self.config.keep_checkpoints,
        )

    def _zero_pieces(self, names: list[str]) -> tuple[list[Any], dict[str, Any], list[Any]]:
        """ZeRO: (this rank's pieces, the layout, the optimizer groups) of a checkpoint."""
        lay = self.layout
        params = {n for n, _ in self.model.named_parameters()}
        owned = lay.owned(self.model, self.optimizer)
        # Buffers (e.g. routing biases) are the same on every rank: rank 0 writes them.
        buffers = {n: v for n, v in self.model.state_dict().items() if n not in params}
        if self.group.is_root:
            owned += [(n, 0, v, {}) for n, v in buffers.items()]
        layout = lay.sharded_layout(self.model, names)
        layout["buffers"] = [[n, list(v.shape)] for n, v in buffers.items()]
        index = 0
        groups = []
        for g in self.optimizer.param_groups:
            hyper = {k: v for k, v in g.items() if k != "params"}
            groups.append({**hyper, "params": list(range(index, index + len(g["params"])))})
            index += len(g["params"])
        return owned, layout, groups

    def _pipeline_pieces(self) -> tuple[list[Any], dict[str, Any], list[Any], dict[str, Any]]:
        """Pipeline: the same, every rank writing the tensors it counts, plus the MoE loads
        of the whole model (a collective)."""
        assert self.pipeline is not None
        stage, lay = self.pipeline.params, self.layout
        ep_rank = lay.ep_group.rank if lay.ep > 1 else 0
        hyper = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        layout, groups = stage.checkpoint_layout(hyper)
        owned = stage.owned(self.model, self.optimizer, ep_rank)
        return owned, layout, groups, {"moe_load": stage.moe_loads(self.model)}

    def _checkpoint_state(
        self, metrics: MetricsLog, groups: list[dict[str, Any]], scalars: dict[str, Any]
    ) -> dict[str, Any]:
        """Everything of a checkpoint but the tensors."""
        return {
            "config": self.config.to_dict(),
            "optimizer": {"param_groups": groups, "scalars": scalars},
            "schedule": self.schedule.state_dict(),
            "monitor": self.monitor.state_dict(),
            "precision": self.precision.state_dict(),
            "moe_load": [layer._load_since_update.tolist() for layer in self.moe_layers],
            "rng": get_rng_state(),
            "metrics_offset": metrics.offset,
            "last_val": self.last_val,
            "corpus": {"name": self.data.name, "sha256": self.data.digest},
            "moecore_version": moecore.__version__,
        }

    # -- the loop ------------------------------------------------------------------------
    def evaluate(self) -> float:
        """Mean loss over the fixed validation batches."""
        was_training = self.model.training
        self.model.eval()
        try:
            with moecore.no_grad(), self.precision.compute():
                if self.pipeline is not None:
                    return self.pipeline.evaluate(self._val)
                losses = [self.model(x, y).item() for x, y in self._val]
        finally:
            self.model.train(was_training)
        return float(np.mean(losses))

    def _train_step(self) -> dict[str, Any]:
        cfg = self.config
        accum = cfg.grad_accum
        total_loss = 0.0
        loads = [np.zeros(n, np.int64) for n in self.moe_experts]
        dropped = 0
        routing = RoutingTotals(len(self.moe_experts), accum)
        g = self.group
        rows = cfg.batch_size // g.size
        if self.pipeline is not None:
            total_loss, dropped = self._pipeline_step(loads, routing)
        for micro in range(accum if self.pipeline is None else 0):
            # Data parallel: each rank reads only its rows of the same global batch.
            mine = slice(g.rank * rows, (g.rank + 1) * rows)
            x, y = self.data.train_batch(
                cfg.seq_len, cfg.batch_size, cfg.seed, self.step, micro, rows=mine
            )
            with self.precision.compute():
                loss = self.model(x, y)
                total_loss += loss.item() / accum
                sync = g.size == 1 or micro == accum - 1
                with contextlib.nullcontext() if sync else self.layout.no_sync():
                    loss = self.precision.scaled(loss)
                    (loss * (1.0 / accum) if accum > 1 else loss).backward()
            for i, layer in enumerate(self.moe_layers):
                loads[i] += layer.last_stats["tokens_per_expert"]
                dropped += layer.last_stats["dropped"]
            routing.add(self.moe_layers)
        if g.size > 1:
            self.layout.finish()
            # Loss, routing statistics and the bias update use the whole global batch.
            # … and the ranks' stop votes (SIGTERM/SIGUSR1), so all stop at the same step.
            summed = np.array([total_loss, dropped, *self.stop.flags()], dtype=np.float64)
            g.allreduce(summed)
            total_loss, dropped = float(summed[0]) / cfg.dp / cfg.ep, int(summed[1])
            self.stop.agree(summed[2:])
            for load in loads:
                g.allreduce(load)
            if self.pipeline is not None:
                self.pipeline.params.sum_moe_loads(self.model)
            for layer in self.moe_layers if self.pipeline is None else []:
                g.allreduce(layer._load_since_update)
            routing.allreduce(g, replicas=cfg.dp * cfg.ep)
        self.precision.unscale_(list(self.model.parameters()))
        if self.pipeline is not None:
            grad_norm = self.pipeline.params.clip_grad_norm_(self.model, cfg.clip)
        else:
            grad_norm = self.layout.clip_grad_norm_(cfg.clip)
        if cfg.agc:
            optim.adaptive_clip_grad_(self.model.parameters(), cfg.agc)
        overflow = self.precision.overflowed(grad_norm)
        # fp16: an overflowed step is skipped and the scale backs off; not a bad step.
        flags = (
            {"skipped": True, "spike": False, "overflow": True}
            if overflow
            else self.monitor.observe(total_loss, grad_norm)
        )
        if not flags["skipped"]:
            self.optimizer.step()
            for layer in self.moe_layers:
                layer.update_bias()
        self.optimizer.zero_grad()
        lr = self.optimizer.param_groups[0]["lr"]
        self.schedule.step()
        self.step += 1
        cvs = [routing_summary(load)["cv"] for load in loads]
        # A collective under expert parallelism: every rank computes it.
        checksum = None
        if cfg.param_checksum and self.pipeline is not None:
            checksum = self.pipeline.params.checksums(self.model)
        elif cfg.param_checksum:
            with self.layout.full_params():
                checksum = param_checksums(self.model, self.layout)
        return {
            "step": self.step,
            "loss": total_loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "expert_load": [load.tolist() for load in loads],
            "load_cv": cvs,
            "dropped": dropped,
            **routing.record(loads),
            **flags,
            **self.precision.record(),
            **({"param_checksum": checksum} if checksum is not None else {}),
        }

    def _moe_indexed(self) -> list[tuple[int, Any]]:
        """(index over the whole model, layer) of the MoE layers this rank holds."""
        if self.pipeline is None:
            return list(enumerate(self.moe_layers))
        return [(i, layer) for i, _, layer in self.pipeline.params.local_moe(self.model)]

    def _num_parameters(self) -> int:
        """Learnable scalars of the whole model."""
        if self.pipeline is not None:
            return self.pipeline.params.num_parameters
        return self.layout.num_parameters(self.model)

    def _pipeline_step(self, loads: list[np.ndarray], routing: RoutingTotals) -> tuple[float, int]:
        """The step's micro-batches through this rank's pipeline stages; (this rank's share
        of the mean loss, tokens dropped here)."""
        assert self.pipeline is not None
        cfg, rows, at = self.config, self.pipeline.rows, self.pipeline.stage_world.rank
        mine = slice(at * rows, (at + 1) * rows)
        dropped = 0

        def batch(mb: int) -> tuple[Any, Any]:
            return self.data.train_batch(
                cfg.seq_len, cfg.batch_size, cfg.seed, self.step, mb, rows=mine
            )

        def on_moe(i: int, layer: Any) -> None:
            nonlocal dropped
            loads[i] += layer.last_stats["tokens_per_expert"]
            dropped += layer.last_stats["dropped"]
            routing.add_layer(i, layer)

        loss = self.pipeline.run(batch, on_moe)
        return loss, dropped

    def train(self) -> TrainResult:
        """Trains until ``config.steps`` (from wherever the run is). Ctrl-C finishes the step,
        saves a checkpoint and returns with ``interrupted=True``; SIGTERM/SIGUSR1 the same
        with ``preempted_by`` set; a second Ctrl-C raises KeyboardInterrupt without saving."""
        cfg = self.config
        progress = Progress(cfg.steps, self.out)
        metrics: Any = (
            MetricsLog(self.run_dir / "metrics.jsonl", self._metrics_offset)
            if self.group.is_root
            else _NoMetrics()
        )
        if self.group.is_root:
            (self.run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
            self._save_tokenizer()
        if self.step == 0:
            progress.message(f"data   {self.data.describe()}")
            progress.message(
                f"model  {self._num_parameters():,} parameters, {cfg.n_layers} layers, "
                f"{cfg.routed_experts()[0]} experts top-{cfg.routed_experts()[1]}; run dir {self.run_dir}"
            )
            progress.message(f"memory {self.memory.describe()} per rank")
        else:
            progress.message(f"resuming {self.run_dir} at step {self.step}")
        if self.resumed_from is not None and self.group.is_root:
            for event in self.resumed_from.set_aside():
                metrics.write({"step": self.step, **event})
        tokens_per_step = cfg.batch_size * cfg.grad_accum * cfg.seq_len
        start = time.perf_counter()
        first_step = self.step
        record: dict[str, Any] = {"loss": float("nan")}
        interrupted = False
        preempted_by = None
        self.stop.install()
        try:
            while self.step < cfg.steps:
                t0 = time.perf_counter()
                record = self._train_step()
                dt = time.perf_counter() - t0
                record["tokens_per_s"] = tokens_per_step / dt
                record["seconds"] = time.perf_counter() - start
                record.update(rss_record())
                # Under pp every rank of the world (stage = rank // (dp · ep)).
                world = self.group if self.pipeline is not None else None
                record.update(self.layout.memory_record(self.optimizer, world))
                if cfg.eval_every and (self.step % cfg.eval_every == 0 or self.step == cfg.steps):
                    self.last_val = self.evaluate()
                    record["val_loss"] = self.last_val
                metrics.write(record)
                note = (
                    ("loss spike" + (" (skipped)" if record["skipped"] else ""))
                    if record["spike"]
                    else ("skipped (non-finite)" if record["skipped"] else "")
                )
                done = self.step - first_step
                eta = (time.perf_counter() - start) / max(done, 1) * (cfg.steps - self.step)
                progress.update(
                    self.step,
                    record["loss"],
                    record["tokens_per_s"],
                    record["lr"],
                    float(np.mean(record["load_cv"])) if record["load_cv"] else 0.0,
                    eta,
                    record.get("val_loss"),
                    note,
                )
                self.monitor.check(record["loss"], record["grad_norm"])
                if (
                    cfg.checkpoint_every
                    and self.step % cfg.checkpoint_every == 0
                    and self.step < cfg.steps
                ):
                    self.save_checkpoint(metrics)
                if self.stop.should_stop(self.group.size) and self.step < cfg.steps:
                    if self.stop.preempted(self.group.size):
                        preempted_by = self.stop.describe(self.group.size)
                        progress.message(f"{preempted_by} at step {self.step}: saving a checkpoint")
                    else:
                        interrupted = True
                        progress.message(f"interrupted at step {self.step}: saving a checkpoint")
                    break
        except KeyboardInterrupt:
            # A second Ctrl-C, inside a step: its update may be half applied, so nothing is
            # saved; the last checkpoint stays the latest.
            self.stop.restore()
            metrics.close()
            progress.close()
            progress.message(f"interrupted again during step {self.step + 1}: not saved")
            raise
        except BaseException:
            self.stop.restore()
            metrics.close()
            raise
        if self.step > first_step or interrupted:
            path = self.save_checkpoint(metrics)
            progress.close()
            progress.message(f"checkpoint {path}")
        if preempted_by is not None or interrupted:
            self.group.barrier()  # no rank leaves before rank 0 has written the checkpoint
        self.stop.restore()
        metrics.close()
        return TrainResult(
            steps_done=self.step,
            steps_run=self.step - first_step,
            final_loss=float(record["loss"]),
            val_loss=self.last_val,
            interrupted=interrupted,
            seconds=time.perf_counter() - start,
            run_dir=self.run_dir,
            preempted_by=preempted_by,
        )
