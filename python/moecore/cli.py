"""The ``moecore`` command: a thin argparse layer over library calls."""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from moecore.cli_args import non_negative_float, non_negative_int, positive_float, positive_int


def _format_status(status: dict[str, Any]) -> str:
    if not status.get("available"):
        return f"no ({status.get('reason', 'unavailable')})"
    details = ", ".join(f"{k} {v}" for k, v in status.items() if k != "available")
    return f"yes ({details})"


def _cmd_plan(args: argparse.Namespace) -> int:
    import numpy as np

    from moecore.comm import CostModel, Link
    from moecore.distributed import parse_compress
    from moecore.train import ConfigError, build_config, parse_overrides
    from moecore.train.plan import compression_costs, copy_cost, plan, profile_step
    from moecore.train.trainer import build_model, build_optimizer

    try:
        config = build_config(args.preset, args.config, parse_overrides(args.set or []))
        compressor = parse_compress(args.compress)
        if any(w < 1 for w in args.workers) or args.ranks_per_node < 1:
            raise ValueError("--workers and --ranks-per-node must be ≥ 1")
        if args.gbit <= 0 or args.intra_gbit <= 0:
            raise ValueError("--gbit and --intra-gbit must be > 0")
        if any(not mb > 0 for mb in args.bucket_mb):
            raise ValueError(f"--bucket-mb must be > 0 MiB, got {args.bucket_mb}")
    except (ConfigError, ValueError, TypeError) as exc:
        return _fail(str(exc))
    model = build_model(config)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, config.vocab_size, size=(config.batch_size, config.seq_len + 1))
    profile = profile_step(model, ids[:, :-1], ids[:, 1:], build_optimizer(model, config))
    ratio = None if compressor is None else compressor.ratio
    per_elem, per_entry = compression_costs(ratio or 0.01)
    cost = CostModel(
        ranks_per_node=args.ranks_per_node,
        intra=Link(args.intra_latency_us * 1e-6, args.intra_gbit),
        inter=Link(args.latency_us * 1e-6, args.gbit),
        hierarchical=args.hierarchical,
        compress_s_per_elem=per_elem,
        decode_s_per_entry=per_entry,
        copy_s_per_byte=copy_cost(),
    )
    rows = plan(model, profile, args.workers, cost, ratio, args.bucket_mb)
    best = _fastest_cap(rows) if len(args.bucket_mb) > 1 else {}
    if args.json:
        print(json.dumps({"profile": profile.__dict__, "rows": rows}, indent=1))
        return 0
    compute = sum(profile.backward_s) + profile.forward_s + profile.optimizer_s
    print(
        f"profiled step (batch {config.batch_size} x {config.seq_len} per rank): "
        f"{compute * 1e3:.1f} ms compute (forward {profile.forward_s * 1e3:.1f}, backward "
        f"{sum(profile.backward_s) * 1e3:.1f}, optimizer {profile.optimizer_s * 1e3:.1f}); "
        f"link {args.gbit:g} Gbit/s, {args.latency_us:g} us between nodes, "
        f"{args.ranks_per_node} ranks per node"
        + (" (hierarchical all-reduce)" if args.hierarchical else "")
    )
    print(
        f"{'workers':>7}  {'bucket MiB':>10}  {'variant':<16} {'step ms':>9} {'exposed ms':>11} "
        f"{'comm ms':>9} {'hidden':>7}"
    )
    for r in rows:
        hidden = 1 - r["exposed_s"] / r["comm_s"] if r["comm_s"] > 0 else 1.0
        mark = (
            "  <- fastest cap" if best.get((r["workers"], r["variant"])) == r["bucket_mb"] else ""
        )
        print(
            f"{r['workers']:>7}  {r['bucket_mb']:>10g}  {r['variant']:<16} "
            f"{r['step_s'] * 1e3:>9.1f} {r['exposed_s'] * 1e3:>11.1f} {r['comm_s'] * 1e3:>9.1f} "
            f"{max(hidden, 0.0):>7.0%}{mark}"
        )
    return 0


def _fastest_cap(rows: list[dict[str, Any]]) -> dict[tuple[int, str], float]:
    """For each (workers, variant), the bucket cap with the shortest predicted step."""
    best: dict[tuple[int, str], tuple[float, float]] = {}
    for r in rows:
        key = (r["workers"], r["variant"])
        if key not in best or r["step_s"] < best[key][0]:
            best[key] = (r["step_s"], r["bucket_mb"])
    return {key: cap for key, (_, cap) in best.items()}


def _cmd_info(args: argparse.Namespace) -> int:
    from moecore.info import collect, format_kernel_level  # lazy: keep `moecore --help` fast

    facts = collect()
    if args.json:
        print(json.dumps(facts, indent=2))
        return 0
    rows = [
        ("moecore", facts["moecore"]),
        ("build profile", facts["build_profile"]),
        ("target", facts["target"]),
        ("CPU features", " ".join(facts["cpu_features"]) or "(none detected)"),
        ("kernel level", format_kernel_level(facts["kernel_level"])),
        ("CPU cores", f"{facts['cpu_count']} (rayon threads {facts['rayon_threads']})"),
        ("python", facts["python"]),
        ("numpy", facts["numpy"]),
        ("CuPy / GPU", _format_status(facts["cupy"])),
        ("mpi4py / MPI", _format_status(facts["mpi"])),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    return 0


def _fail(message: str) -> int:
    print(f"moecore: error: {message}", file=sys.stderr)
    return 2


def _run_dir_problem(out: Path) -> str | None:
    """Why ``out`` cannot take a new run, or None."""
    if out.exists() and not out.is_dir():
        return f"--out {out} is a file, not a folder"
    checkpoints = out / "checkpoints"
    if checkpoints.exists() and not checkpoints.is_dir():
        return f"{checkpoints} is a file; a run keeps its checkpoints in that folder"
    if checkpoints.is_dir() and any(checkpoints.iterdir()):
        return f"{out} already holds a run; use --resume {out} or another --out"
    return None


def _cmd_train(args: argparse.Namespace) -> int:
    """``moecore train``. Under mpiexec an error may be this rank's alone (a data file
    missing on one node, an exception in its step): shown, it then ends every rank
    (``MPI_Abort``), as the others would wait for this one forever in a collective."""
    from moecore.distributed import abort_job, world_size_from_env
    from moecore.train.preemption import PREEMPTED_EXIT

    try:
        code = _train(args)
    except BaseException:
        if (world_size_from_env() or 1) > 1:
            traceback.print_exc()  # MPI_Abort ends the process before Python would show it
            abort_job(1)
        raise
    if code not in (0, PREEMPTED_EXIT):  # preempted: every rank stopped together
        abort_job(code)
    return code


def _train(args: argparse.Namespace) -> int:
    from moecore.data import DataError
    from moecore.train import (
        CheckpointError,
        ConfigError,
        Trainer,
        TrainingDiverged,
        build_config,
        parse_overrides,
    )

    try:
        overrides: dict[str, Any] = parse_overrides(args.set or [])
        if args.data is not None:
            overrides["data"] = args.data
        if args.vocab is not None:
            overrides["vocab"] = args.vocab
        for flag, key in (
            ("dp", "dp"),
            ("ep", "ep"),
            ("compress", "compress"),
            ("bucket_mb", "bucket_mb"),
            ("comm_policy", "comm_policy"),
            ("zero", "zero"),
            ("compress_warmup", "compress_warmup"),
            ("ranks_per_node", "ranks_per_node"),
            ("pp", "pp"),
            ("micro_batches", "grad_accum"),
            ("pp_schedule", "pp_schedule"),
            ("virtual_stages", "virtual_stages"),
            ("pp_balance", "pp_balance"),
        ):
            if getattr(args, flag) is not None:
                overrides[key] = getattr(args, flag)
        if (problem := _missing_run(args.resume)) is not None:
            return _fail(problem)
        if args.resume:
            trainer = Trainer.resume(Path(args.resume), overrides=overrides)
        else:
            config = build_config(args.preset, args.config, overrides)
            out = Path(args.out) if args.out else Path("runs") / time.strftime("%Y%m%d-%H%M%S")
            problem = _run_dir_problem(out)
            if problem is not None:
                return _fail(problem)
            trainer = Trainer(config, out)
        result = trainer.train()
    except (ConfigError, DataError, CheckpointError) as exc:
        return _fail(str(exc))
    except OSError as exc:
        # The run folder or a file in it cannot be written (a file where a folder should be,
        # no space left, no permission).
        return _fail(f"cannot write the run: {exc}")
    except TrainingDiverged as exc:
        print(f"moecore: {exc}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:  # a second Ctrl-C inside a step (the first one saves)
        print("moecore: interrupted; the unfinished step was not saved", file=sys.stderr)
        return 130
    if result.preempted_by is not None:
        from moecore.train.preemption import PREEMPTED_EXIT

        print(
            f"preempted ({result.preempted_by}) after {result.steps_done} steps: checkpoint "
            f"saved; continue with --resume {result.run_dir} (exit {PREEMPTED_EXIT})"
        )
        return PREEMPTED_EXIT
    if result.steps_run == 0 and not result.interrupted:
        print(
            f"nothing to do: {result.run_dir} is already at step {result.steps_done}, its "
            "last; give it more with --set steps=N"
        )
        return 0
    status = "interrupted" if result.interrupted else "finished"
    val = f", val loss {result.val_loss:.4f}" if result.val_loss is not None else ""
    print(
        f"{status} after {result.steps_done} steps in {result.seconds:.0f} s: loss {result.final_loss:.4f}{val}"
    )
    return 0


def _missing_run(run: str | None) -> str | None:
    """Why ``run`` is not a run directory, or None."""
    if run is not None and not Path(run).is_dir():
        return f"run directory {run} does not exist"
    return None


def _load_run(run: str) -> Any:
    from moecore.train import checkpoint
    from moecore.train.config import config_from_dict
    from moecore.train.recovery import ResumeReport
    from moecore.train.trainer import build_model

    notes: list[str] = []
    used, groups, state, damaged = checkpoint.newest_intact(Path(run), notes)
    ResumeReport(used, damaged, notes).warn()
    config = config_from_dict(state["config"])
    model = build_model(config)
    model.load_state_dict(groups["model"])
    return model, config, state


def _cmd_generate(args: argparse.Namespace) -> int:
    from moecore.data.tokenizer import run_tokenizer
    from moecore.train import CheckpointError, ConfigError
    from moecore.train.generate import generate, generate_ids

    if (problem := _missing_run(args.run)) is not None:
        return _fail(problem)
    try:
        model, _, _ = _load_run(args.run)
        # A run on prepared data keeps its tokenizer.json; otherwise tokens are bytes.
        tok = run_tokenizer(Path(args.run))
        stats: dict[str, Any] = {}
        spec = {"speculative": args.speculative, "stats": stats}
        if tok is None:
            out = generate(
                model,
                args.prompt.encode(),
                args.tokens,
                args.temperature,
                args.top_k,
                args.seed,
                **spec,
            )
            text = out.decode("utf-8", errors="replace")
        else:
            ids = generate_ids(
                model,
                tok.encode(args.prompt),
                args.tokens,
                args.temperature,
                args.top_k,
                args.seed,
                **spec,
            )
            text = tok.decode(ids)
    except (CheckpointError, ConfigError, ValueError) as exc:
        return _fail(str(exc))
    sys.stdout.write(args.prompt + text + "\n")
    if args.speculative:
        sys.stderr.write(
            f"speculative decoding: {stats['accepted']}/{stats['drafted']} MTP drafts accepted "
            f"(rate {stats['accept_rate']:.3f}), {stats['forwards']} forwards for "
            f"{args.tokens} tokens\n"
        )
    return 0


def _cmd_prepare(args: argparse.Namespace) -> int:
    from moecore.data import DataError
    from moecore.data.prepare import prepare

    try:
        index = prepare(
            args.inputs,
            args.out,
            tokenizer=args.tokenizer,
            train_vocab=args.train_bpe,
            eod=args.eod,
            workers=args.workers,
            shard_mb=args.shard_mb,
        )
    except DataError as exc:
        return _fail(str(exc))
    except OSError as exc:
        return _fail(f"cannot prepare {args.out}: {exc}")
    print(
        f"{args.out}: {index['tokens']:,} tokens ({index['dtype']}, vocab {index['vocab_size']:,}) "
        f"in {len(index['shards'])} shard(s), {index['documents']:,} documents from "
        f"{index['files']} file(s); train with --data {args.out}"
    )
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from moecore.data import DataError
    from moecore.train import CheckpointError, ConfigError, Trainer
    from moecore.train.eval_set import eval_batches, evaluate_windows

    if (problem := _missing_run(args.run)) is not None:
        return _fail(problem)
    try:
        trainer = Trainer.resume(Path(args.run))
        if args.windows is None:
            loss = trainer.evaluate()
        else:
            if len(trainer.data.corpora) > 1:
                raise DataError("--windows scores one corpus; this run trains on a mixture")
            batches = eval_batches(trainer.corpus.tokens, args.windows, trainer.config.seq_len)
            loss = evaluate_windows(trainer.model, batches)
    except (CheckpointError, ConfigError, DataError, ValueError) as exc:
        return _fail(str(exc))
    record = {"step": trainer.step, "val_loss": loss}
    if args.windows is not None:
        record["windows"] = args.windows
    corpus = trainer.corpus
    if corpus.tokenizer is None:  # raw bytes: a token is a byte
        record["val_ppl_per_byte"] = float(2.718281828459045**loss)
    else:
        record["val_ppl_per_token"] = float(2.718281828459045**loss)
        if corpus.val_bytes and len(trainer.data.corpora) == 1 and args.windows is None:
            nats_per_byte = loss * len(corpus.val) / corpus.val_bytes
            record["val_bits_per_byte"] = nats_per_byte / 0.6931471805599453
    print(json.dumps(record))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from moecore.train.report import report

    if (problem := _missing_run(args.run)) is not None:
        return _fail(problem)
    metrics = Path(args.run) / "metrics.jsonl"
    if not metrics.is_file():
        return _fail(f"{metrics} does not exist")
    text, png = report(Path(args.run))
    print(text)
    print(f"plot written to {png}" if png else "(install matplotlib for a PNG plot)")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from moecore.train.verify import NOTHING, verify_run

    if (problem := _missing_run(args.run)) is not None:
        _fail(problem)
        return NOTHING
    return verify_run(Path(args.run), sys.stdout)


def _cmd_export(args: argparse.Namespace) -> int:
    from moecore.train.export import export

    try:
        source = export(Path(args.source), Path(args.out))
    except (OSError, ValueError) as exc:
        return _fail(str(exc))
    print(f"wrote {args.out} from {source}")
    return 0


def _cmd_check_cuda(args: argparse.Namespace) -> int:
    from moecore.kernels.cuda import compile_check

    try:
        return compile_check.check(tuple(args.arch or compile_check.DEFAULT_ARCHS))
    except ModuleNotFoundError as exc:  # CuPy, whose NVRTC binding compiles the kernels
        _fail(f'check-cuda needs CuPy and NVRTC ({exc}): pip install "moecore[gpu-ci]"')
        return 1


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``moecore``, one sub-command per job."""
    parser = argparse.ArgumentParser(
        prog="moecore", description="Mixture-of-Experts training with a Rust core."
    )
    from moecore import __version__

    parser.add_argument("--version", action="version", version=f"moecore {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    train = sub.add_parser(
        "train",
        help="train an MoE language model (default: preset moe-small on the built-in corpus)",
    )
    train.add_argument(
        "--preset",
        default="moe-small",
        help="named configuration to start from (moe-small, moe-32, moe-tiny)",
    )
    train.add_argument("--config", help="TOML run configuration (applied over the preset)")
    train.add_argument(
        "--set",
        nargs="+",
        action="extend",
        metavar="KEY=VALUE",
        help="override configuration keys, e.g. steps=50 batch_size=8 (may be repeated)",
    )
    train.add_argument("--out", help="run directory (default runs/<timestamp>)")
    train.add_argument(
        "--resume", metavar="RUN_DIR", help="continue the newest checkpoint of RUN_DIR exactly"
    )
    train.add_argument(
        "--data",
        help="a `moecore prepare` folder, a mixture 0.7:DIR_A,0.3:DIR_B, a text file, a folder "
        "of text files, or a .bin/.npy of uint16 token ids (default: the built-in corpus)",
    )
    train.add_argument("--vocab", type=positive_int, help="vocabulary size of .bin/.npy token data")
    dist = train.add_argument_group(
        "distributed", "run under mpiexec -n DP (pip install 'moecore[mpi]')"
    )
    dist.add_argument("--dp", type=positive_int, help="data-parallel ranks (= mpiexec -n)")
    dist.add_argument(
        "--ep",
        type=positive_int,
        help="expert-parallel ranks (mpiexec -n dp·ep; n_experts / ep each)",
    )
    dist.add_argument("--pp", type=positive_int, help="pipeline-parallel ranks (mpiexec -n pp·dp)")
    dist.add_argument(
        "--micro-batches", type=positive_int, help="micro-batches per step (= grad_accum)"
    )
    dist.add_argument(
        "--schedule",
        dest="pp_schedule",
        choices=("gpipe", "1f1b", "interleaved", "dualpipe"),
        help="pipeline schedule (1f1b)",
    )
    dist.add_argument(
        "--virtual-stages", type=positive_int, help="model chunks per rank, interleaved (2)"
    )
    dist.add_argument(
        "--pp-balance", choices=("uniform", "profile"), help="stage cut by layer count or time"
    )
    dist.add_argument("--compress", help="gradient compression: none or topk:<ratio>")
    dist.add_argument(
        "--compress-warmup", type=non_negative_int, help="dense steps before compressing"
    )
    dist.add_argument("--bucket-mb", type=positive_float, help="gradient bucket cap in MiB (25)")
    dist.add_argument(
        "--comm-policy", choices=["fifo", "priority"], help="bucket launch policy (fifo)"
    )
    dist.add_argument(
        "--zero",
        type=int,
        choices=[0, 1, 2, 3],
        help="ZeRO stage: 1 shards the optimizer state over the ranks, 2 also the gradients, "
        "3 also the parameters (0)",
    )
    dist.add_argument(
        "--ranks-per-node",
        type=positive_int,
        help="> 1: hierarchical all-reduce over nodes of this size",
    )
    train.set_defaults(handler=_cmd_train)

    gen = sub.add_parser("generate", help="sample text from a trained run")
    gen.add_argument(
        "--run",
        required=True,
        metavar="RUN_DIR",
        help="run directory (its newest checkpoint is used)",
    )
    gen.add_argument("--prompt", default="def ", help="text to continue")
    gen.add_argument("--tokens", type=positive_int, default=200, help="tokens (bytes) to generate")
    gen.add_argument(
        "--temperature",
        type=non_negative_float,
        default=0.8,
        help="sampling temperature (0 = greedy)",
    )
    gen.add_argument(
        "--top-k", type=positive_int, default=None, help="sample among the k most likely bytes"
    )
    gen.add_argument("--seed", type=non_negative_int, default=0, help="sampling seed")
    gen.add_argument(
        "--speculative",
        action="store_true",
        help="greedy speculative decoding with the model's MTP modules (needs --temperature 0); "
        "reports the accepted-draft rate",
    )
    gen.set_defaults(handler=_cmd_generate)

    prep = sub.add_parser(
        "prepare",
        help="tokenize text files, folders and JSON Lines into token shards for --data",
    )
    prep.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="text files (one document each), folders of them, JSON Lines (.jsonl: one "
        "document per line, its 'text' field), or 'builtin' (the built-in corpus)",
    )
    prep.add_argument("--out", required=True, metavar="DIR", help="folder of shards to write")
    how = prep.add_mutually_exclusive_group()
    how.add_argument(
        "--tokenizer",
        default="bytes",
        metavar="SPEC",
        help="a tokenizer.json (pip install 'moecore[data]') or 'bytes' (default)",
    )
    how.add_argument(
        "--train-bpe",
        type=positive_int,
        metavar="N",
        help="train a byte-level BPE of N ids on the inputs (pip install 'moecore[data]')",
    )
    prep.add_argument(
        "--eod", metavar="TOKEN", help="end-of-document token of --tokenizer (default: found)"
    )
    prep.add_argument(
        "--workers", type=positive_int, default=1, help="processes tokenizing shards (1)"
    )
    prep.add_argument(
        "--shard-mb", type=positive_float, default=64.0, help="input MiB per shard (64)"
    )
    prep.set_defaults(handler=_cmd_prepare)

    ev = sub.add_parser("eval", help="validation loss of a run's newest checkpoint")
    ev.add_argument("--run", required=True, metavar="RUN_DIR", help="run directory")
    ev.add_argument(
        "--windows",
        type=int,
        metavar="N",
        help="score N evenly strided windows of the last 1/20 of the corpus in batches of 16 "
        "(512: the set of docs/recipe.md) instead of the run's own validation batches",
    )
    ev.set_defaults(handler=_cmd_eval)

    rep = sub.add_parser("report", help="summary of a run (and a PNG with matplotlib)")
    rep.add_argument("run", metavar="RUN_DIR", help="run directory")
    rep.set_defaults(handler=_cmd_report)

    ver = sub.add_parser(
        "verify",
        help="check every checkpoint of a run against its checksums "
        "(exit 0 intact, 1 damage found, 2 no run or no checkpoint)",
    )
    ver.add_argument("run", metavar="RUN_DIR", help="run directory")
    ver.set_defaults(handler=_cmd_verify)
    exp = sub.add_parser(
        "export",
        help="the model weights of a checkpoint (sharded by ZeRO or not) in one safetensors "
        "file of the single-process layout",
    )
    exp.add_argument(
        "source",
        metavar="RUN_OR_CHECKPOINT",
        help="a run (its newest intact checkpoint) or a checkpoint folder",
    )
    exp.add_argument("--out", required=True, help="the .safetensors file to write")
    exp.set_defaults(handler=_cmd_export)

    pl = sub.add_parser(
        "plan", help="predict step time and exposed communication at 2 to 1024 workers"
    )
    pl.add_argument("--preset", default="moe-small", help="model preset (default moe-small)")
    pl.add_argument("--config", help="TOML run configuration (applied over the preset)")
    pl.add_argument("--set", nargs="*", metavar="KEY=VALUE", help="override run settings")
    pl.add_argument("--workers", type=positive_int, nargs="+", default=[2, 8, 64, 256, 1024])
    pl.add_argument(
        "--gbit", type=positive_float, default=10.0, help="inter-node bandwidth, Gbit/s"
    )
    pl.add_argument(
        "--latency-us", type=non_negative_float, default=50.0, help="inter-node latency"
    )
    pl.add_argument("--ranks-per-node", type=positive_int, default=1)
    pl.add_argument("--intra-gbit", type=positive_float, default=100.0, help="intra-node bandwidth")
    pl.add_argument("--intra-latency-us", type=non_negative_float, default=5.0)
    pl.add_argument("--hierarchical", action="store_true", help="hierarchical all-reduce")
    pl.add_argument("--compress", default="topk:0.01", help="none or topk:<ratio>")
    pl.add_argument(
        "--bucket-mb",
        type=positive_float,
        nargs="+",
        default=[25.0],
        help="gradient bucket cap(s) in MiB (default 25); several are compared side by side",
    )
    pl.add_argument("--json", action="store_true", help="print the rows as JSON")
    pl.set_defaults(handler=_cmd_plan)

    info = sub.add_parser(
        "info", help="show the build, CPU features, numpy, GPU and MPI availability"
    )
    info.add_argument("--json", action="store_true", help="print the facts as JSON")
    info.set_defaults(handler=_cmd_info)

    cuda = sub.add_parser(
        "check-cuda",
        help="compile every CUDA kernel with NVRTC, no GPU needed; print registers, shared "
        "memory and spills per kernel (exit 1 on any error, warning or spill)",
    )
    cuda.add_argument(
        "--arch", nargs="+", metavar="SM", help="target architectures (default: sm_80 sm_90)"
    )
    cuda.set_defaults(handler=_cmd_check_cuda)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs ``moecore`` with ``argv`` (default: ``sys.argv[1:]``) and returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # a bad argument (message shown; 2) or --help (0)
        return int(exc.code or 0)
    if getattr(args, "handler", None) is None:
        parser.print_help()
        return 2
    return int(args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
