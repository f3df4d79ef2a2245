"""Benchmark commands: ``bench train``, ``bench knn``, ``bench propagate`` and ``bench score``, each
writing one JSON file.

Every report carries the command line and, where the machine may be shared, its load average, so a
figure can be re-run and judged. ``bench knn`` and ``bench propagate`` pose the same kind of problem
(``--users`` rows of width ``--dim`` with ``--k`` neighbours, a one-process phase timed against
``--ranks`` spawned gloo ranks sharing ``--threads``): :func:`_add_two_phase_args` declares those
options once, with each command's words for what its phases are.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from cstwa_dist.cli.common import add_config_args, add_json_out, command_line, emit_json, require_positive
from cstwa_dist.registry import load_config, trainable_models

logger = logging.getLogger(__name__)


def _write_report(out: str, report: dict[str, Any], summary: dict[str, Any]) -> None:
    """The full report to ``out``; its headline figures on stdout, where the user is looking."""
    from cstwa_dist.fs import atomic_write_json

    atomic_write_json(out, report, sort_keys=False)
    emit_json(summary)
    logger.info("wrote %s", out)


def cmd_bench_train(args: argparse.Namespace) -> int:
    import torch

    from cstwa_dist.bench.train import compute_only, ranks_phase, verdict
    from cstwa_dist.distributed.env import command_runtime
    from cstwa_dist.fs import atomic_write_json
    from cstwa_dist.runtime import RayRuntime

    if args.ranks < 1 or args.threads < args.ranks:
        raise ValueError(f"need 1 <= --ranks <= --threads; got {args.ranks} ranks, {args.threads} threads")
    cfg = load_config(args.config, args.overrides)
    threads_per_rank = max(1, args.threads // args.ranks)
    kw = {"epochs": args.epochs, "profile_steps": args.profile_steps}
    if args.ranks_phase_out:  # a rank started by the parent below
        torch.set_num_threads(threads_per_rank)
        with command_runtime(cfg.data.ray_num_cpus, cfg.train.collective_timeout_s) as env:
            report = ranks_phase(cfg, args.model, **kw)
            if env.is_main:
                atomic_write_json(args.ranks_phase_out, report)
        return 0
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()  # the machine may be shared: every figure comes with its load
    with command_runtime(cfg.data.ray_num_cpus, cfg.train.collective_timeout_s):
        compute = compute_only(cfg, args.model, batches=args.compute_batches, steps=args.compute_steps)
        logger.info(
            "compute only: %.0f samples/s (1 process, %d threads)", compute["samples_per_s"], args.threads
        )
        torch.set_num_threads(threads_per_rank)
        if args.ranks == 1:
            ranks = ranks_phase(cfg, args.model, **kw)
        else:
            ranks = _bench_ranks(args, RayRuntime.current_address())
    baseline = json.loads(Path(args.baseline).read_text()) if args.baseline else None
    report = {
        "model": args.model,
        "ranks_requested": args.ranks,
        "threads_total": args.threads,
        "compute_only": compute,
        "ranks": ranks,
        "config": cfg.to_dict(),
        "load_average_1_5_15": {"before": list(load_before), "after": list(os.getloadavg())},
        "cpu_count": os.cpu_count(),
        "command": command_line(),
    }
    report["verdict"] = verdict(report, baseline)
    _write_report(args.out, report, {k: report[k] for k in ("model", "verdict")})
    return 0


def _bench_ranks(args: argparse.Namespace, ray_address: str | None) -> dict[str, Any]:
    """Runs the ranks phase as ``torchrun --nproc_per_node R`` children attached to this Ray runtime."""
    import subprocess
    import tempfile

    from cstwa_dist.distributed.env import free_port

    with tempfile.TemporaryDirectory(prefix="cstwa-bench-") as tmp:
        out = Path(tmp) / "ranks.json"
        cmd = [
            sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.ranks}",
            "--master_addr=127.0.0.1", f"--master_port={free_port()}",
            "-m", "cstwa_dist.cli", "bench", "train", "--model", args.model, "--config", args.config,
            "--ranks", str(args.ranks), "--threads", str(args.threads), "--epochs", str(args.epochs),
            "--profile-steps", str(args.profile_steps), "--ranks-phase-out", str(out), "--out", args.out,
        ]  # fmt: skip
        for o in args.overrides:
            cmd += ["--set", o]
        env = dict(os.environ, OMP_NUM_THREADS=str(max(1, args.threads // args.ranks)))
        if ray_address:
            env["RAY_ADDRESS"] = ray_address
        logger.info("starting %d ranks: %s", args.ranks, " ".join(cmd))
        subprocess.run(cmd, check=True, env=env)
        return json.loads(out.read_text())


def cmd_bench_knn(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from cstwa_dist.bench.knn import representation_dims, run_bench
    from cstwa_dist.structure.ivf import IVFParams

    if args.representations:
        rows, dim = representation_dims(args.representations)
        users = rows if args.users is None else args.users
        if users > rows:
            raise ValueError(f"--users {users} exceeds the {rows} rows of {args.representations}")
    else:
        if args.users is None:
            raise ValueError("--users is required without --representations")
        users, dim = args.users, args.dim
    require_positive(users=users, k=args.k, ranks=args.ranks, threads=args.threads)
    params = IVFParams(nlist=args.nlist, quantizer=args.quantizer, pq_m=args.pq_m, seed=args.seed)
    if args.nprobe is not None:
        params = IVFParams(**{**asdict(params), "nprobe": args.nprobe})
    spec = {
        "users": users,
        "dim": dim,
        "k": args.k,
        "clusters": args.clusters,
        "spread": args.spread,
        "seed": args.seed,
        "representations": args.representations,
    }
    ivf = {"params": asdict(params), "recall_queries": args.recall_queries, "block_rows": args.block_rows}
    exact_queries = args.exact_queries
    if exact_queries is None:
        exact_queries = 0 if users <= 100_000 else 10_000
    load_before = os.getloadavg()  # the machine may be shared: every figure comes with its load
    report = run_bench(
        spec,
        ivf,
        ranks=args.ranks,
        threads=args.threads,
        exact_queries=exact_queries,
        skip_exact=args.no_exact,
        repeats=max(1, args.repeats),
    )
    report["command"] = command_line()
    report["load_average_1_5_15"] = {"before": list(load_before), "after": list(os.getloadavg())}
    summary = {
        "users": users,
        "exact_s": report.get("exact", {}).get("total_s"),
        "ivf_build_s": report["ivf"]["build_s"],
        "ivf_search_s": report["ivf"]["search_s"],
        "recall_at_k": report["ivf"]["recall_at_k"],
        "peak_rss_mb_per_rank": report["ivf"]["peak_rss_mb_max"],
    }
    _write_report(args.out, report, summary)
    return 0


def cmd_bench_propagate(args: argparse.Namespace) -> int:
    from cstwa_dist.bench.propagate import run_bench

    require_positive(
        users=args.users, dim=args.dim, ranks=args.ranks, threads=args.threads, repeats=args.repeats
    )
    if not 1 <= args.k <= args.users:
        raise ValueError(f"--k must lie in [1, --users], got {args.k}")
    if args.layers < 1:
        raise ValueError(f"--layers must be >= 1, got {args.layers}")
    if not 0.0 <= args.locality <= 1.0:
        raise ValueError(f"--locality must lie in [0, 1], got {args.locality}")
    spec = {
        "users": args.users,
        "dim": args.dim,
        "k": args.k,
        "layers": args.layers,
        "locality": args.locality,
        "seed": args.seed,
        "repeats": args.repeats,
    }
    report = run_bench(spec, ranks=args.ranks, threads=args.threads, single_max_users=args.single_max_users)
    report["command"] = command_line()
    summary = {
        "users": args.users,
        "ranks": args.ranks,
        "single_s_per_layer": report["single"].get("seconds_per_layer"),
        "sharded_s_per_layer": report["sharded"]["seconds_per_layer"],
        "exchange_s_per_layer": report["sharded"]["exchange_s_per_layer_max"],
        "ratio_sharded_over_single": report.get("ratio_sharded_over_single_seconds_per_layer"),
        "max_abs_diff": report.get("max_abs_diff_sharded_vs_single"),
        "peak_rss_mb_per_rank": report["sharded"]["peak_rss_mb_max"],
    }
    _write_report(args.out, report, summary)
    return 0


def cmd_bench_score(args: argparse.Namespace) -> int:
    from cstwa_dist.bench.score import run_bench
    from cstwa_dist.export.score import ScoreOptions

    require_positive(batch_size=args.batch_size, repeats=args.repeats)
    options = ScoreOptions(split=args.split, ids=args.ids, actors=args.actors, batch_size=args.batch_size)
    report = run_bench(args.model, args.input, options, repeats=args.repeats, e2e_repeats=args.score_repeats)
    report["command"] = command_line()
    summary = {
        "model": report["model"],
        "rows": report["rows"],
        "forward_only_rows_per_s": report["forward_only"]["rows_per_s"],
        "score_rows_per_s_steady": report["end_to_end"]["rows_per_s_steady"],
        "score_rows_per_s_whole": report["end_to_end"]["rows_per_s_whole"],
        "verdict": report["verdict"],
    }
    _write_report(args.out, report, summary)
    return 0


def _add_two_phase_args(
    p: argparse.ArgumentParser,
    *,
    users_required: bool,
    users: str,
    width_of: str,
    k_note: str,
    ranks_of: str,
    threads_use: str,
) -> None:
    """``--users --dim --k --ranks --threads``, as ``bench knn`` and ``bench propagate`` both take them:
    same types and defaults, each command's help naming what its rows and phases are."""
    p.add_argument("--users", type=int, required=users_required, default=None, help=users)
    p.add_argument("--dim", type=int, default=45, help=f"{width_of} (default 45)")
    p.add_argument("--k", type=int, default=8, help=f"neighbours per row{k_note} (default 8)")
    p.add_argument(
        "--ranks", type=int, default=1, help=f"{ranks_of} ranks (spawned processes, gloo; default 1)"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 1,
        help=f"total CPU threads: {threads_use} (default: all cores)",
    )


def _add_repeats_and_out(p: argparse.ArgumentParser, *, default: int, timed: str) -> None:
    """``--repeats`` (the fastest of ``timed`` per phase is reported: the least disturbed by other load)
    and ``--out``."""
    p.add_argument("--repeats", type=int, default=default, help=f"{timed} per phase; the fastest is reported")
    add_json_out(p)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Registers ``bench`` and its ``BENCHMARK`` subcommands on the top-level ``COMMAND`` subparsers."""
    p = sub.add_parser(
        "bench",
        help="throughput benchmarks writing JSON (bench train, bench score)",
        description="Benchmarks that write JSON; `bench train --help` for the training step.",
    )
    bench_sub = p.add_subparsers(dest="bench_command", required=True, metavar="BENCHMARK")
    p = bench_sub.add_parser(
        "train",
        help="end-to-end, compute-only and input-only rates and per-stage times of a model",
        description="Measures one model on the config's data set: the end-to-end training rate on --ranks "
        "ranks, the compute-only bound (forward + backward + optimizer on in-memory batches, 1 process), the "
        "input-only rate of every rank's reader, and the time per pipeline stage; writes --out JSON with a "
        "verdict (and, with --baseline, the stage to blame when R ranks are slower than 1 process).",
    )
    add_config_args(p)
    p.add_argument(
        "--model", required=True, choices=trainable_models(), metavar="MODEL", help="registered model"
    )
    p.add_argument("--ranks", type=int, default=1, help="training ranks on this node (default 1)")
    p.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 1,
        help="total CPU threads, split evenly over the ranks (default: this machine's cores)",
    )
    p.add_argument("--epochs", type=int, default=1, help="end-to-end epochs (default 1)")
    p.add_argument("--profile-steps", type=int, default=20, help="steps profiled for the stage times")
    p.add_argument("--compute-batches", type=int, default=20, help="batches held in memory (compute only)")
    p.add_argument("--compute-steps", type=int, default=60, help="steps timed for the compute-only bound")
    p.add_argument(
        "--baseline", default=None, help="a 1-process bench JSON of the same model to compare with"
    )
    add_json_out(p)
    p.add_argument("--ranks-phase-out", default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_bench_train)

    p = bench_sub.add_parser(
        "knn",
        help="exact vs distributed IVF kNN: build/search time, recall@k, peak memory per rank",
        description="Times exact Faiss kNN (the reference: one process, IndexFlatIP over all rows; at large "
        "--users on a sample of --exact-queries queries, extrapolated linearly) against the distributed IVF "
        "kNN that pretrain runs by default (structure.knn=ivf) on --ranks spawned gloo ranks, on clustered "
        "Gaussian-mixture vectors or on --representations; writes --out JSON (docs/structure-scaling.md).",
    )
    _add_two_phase_args(
        p,
        users_required=False,
        users="rows N (default: all rows of --representations)",
        width_of="width of generated vectors",
        k_note="",
        ranks_of="IVF",
        threads_use="exact uses all, IVF splits them over the ranks",
    )
    p.add_argument("--nlist", type=int, default=0, help="IVF cells (default 0: 4·sqrt(N))")
    p.add_argument("--nprobe", type=int, default=None, help="cells searched per query (default: IVFParams')")
    p.add_argument(
        "--quantizer", choices=("flat", "hnsw"), default="flat", help="coarse quantizer (default flat)"
    )
    p.add_argument("--pq-m", type=int, default=0, help="PQ bytes per row (default 0: IVF-Flat)")
    p.add_argument(
        "--representations",
        default=None,
        metavar="FILE.npy|DIR",
        help="real [N, d] vectors instead of generated: a .npy file or a pretrain parts folder "
        "(<graph_dir>/<side>_representations/)",
    )
    p.add_argument("--clusters", type=int, default=256, help="Gaussian-mixture clusters (default 256)")
    p.add_argument(
        "--spread", type=float, default=1.0, help="cluster std relative to the centres' (default 1)"
    )
    p.add_argument("--seed", type=int, default=0, help="data, sample and k-means seed (default 0)")
    p.add_argument(
        "--exact-queries",
        type=int,
        default=None,
        help="queries timed for exact search (default: all rows up to 100k, else 10000; 0: all)",
    )
    p.add_argument("--no-exact", action="store_true", help="skip the exact phase")
    p.add_argument(
        "--recall-queries", type=int, default=1000, help="sampled queries for recall@k (default 1000)"
    )
    p.add_argument("--block-rows", type=int, default=65536, help="rows per query block on the ring")
    _add_repeats_and_out(p, default=1, timed="runs")
    p.set_defaults(func=cmd_bench_knn)

    p = bench_sub.add_parser(
        "propagate",
        help="single-process vs row-sharded Structure Migrator propagation: s/layer, exchange, memory",
        description="Times Eq. 9's products on a seeded random kNN graph: the single-process CSR product "
        "with the full graph (this process, all --threads; skipped above --single-max-users) against the "
        "row-sharded propagator on --ranks spawned gloo ranks, each building only its own rows; reports "
        "rows/s, seconds per layer, exchange seconds and bytes, per-rank memory and peak RSS; writes --out "
        "JSON (docs/structure-scaling.md).",
    )
    _add_two_phase_args(
        p,
        users_required=True,
        users="rows N of the graph and the table",
        width_of="table width",
        k_note=", self included",
        ranks_of="sharded",
        threads_use="single uses all, the ranks split them",
    )
    p.add_argument("--layers", type=int, default=2, help="propagation layers L per timed call (default 2)")
    p.add_argument("--seed", type=int, default=0, help="graph and table seed (default 0)")
    p.add_argument(
        "--locality",
        type=float,
        default=0.5,
        help="fraction of each row's neighbours drawn within ±2048 ids of it, the rest uniform (default 0.5; "
        "0 = ids unrelated to the representation, the worst case for the exchange)",
    )
    p.add_argument(
        "--single-max-users",
        type=int,
        default=2_000_000,
        help="skip the single-process phase above this many rows (default 2000000)",
    )
    _add_repeats_and_out(p, default=3, timed="timed calls")
    p.set_defaults(func=cmd_bench_propagate)

    p = bench_sub.add_parser(
        "score",
        help="batch-scoring rate (cstwa-dist score) against the exported model's forward-only bound",
        description="Times the exported model's forward alone in one process (the input's rows mapped and "
        "held in memory as id tensors, batches of --batch-size; fastest of --repeats passes) against "
        "`cstwa-dist score` on the same rows (Parquet read, id mapping, --actors actors, Parquet write; "
        "fastest of --score-repeats runs); writes --out JSON with both rates, their ratio, the cores and a "
        "verdict against the 0.8 target (docs/scoring.md).",
    )
    p.add_argument("--model", required=True, help="exported model folder (`cstwa-dist export`)")
    p.add_argument("--input", required=True, help="a data set folder (its --split) or Parquet files (a glob)")
    p.add_argument(
        "--split", default="test", choices=["train", "val", "test"], help="data set split (default test)"
    )
    p.add_argument(
        "--ids", choices=["rows", "raw"], default=None, help="as for `score` (default: as score's)"
    )
    p.add_argument("--actors", type=int, default=None, help="scoring actors (default: as score's)")
    p.add_argument(
        "--batch-size", type=int, default=16384, help="rows per batch, both phases (default 16384)"
    )
    p.add_argument("--repeats", type=int, default=3, help="forward-only passes; the fastest is reported")
    p.add_argument("--score-repeats", type=int, default=2, help="scoring runs; the fastest is reported")
    add_json_out(p)
    p.set_defaults(func=cmd_bench_score)
