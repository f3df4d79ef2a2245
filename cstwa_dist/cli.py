"""``cstwa-dist <command>``: one entry point whose subcommands follow the data flow of a retrain.

data (``synth``, ``import-aliccp``, ``import-csv``; ``entities`` completes an older data set) →
structure (``pretrain``) → models (``train``, ``experiment``) → results (``report``); docs/method.md,
"Pipeline at a glance", maps each step to the method. Run any training command as one process or under
``torchrun --nproc_per_node=N``; the same code path runs either way. ``synth``, the importers,
``entities`` and ``report`` are single-process tools.

Only light modules are imported at the top (the registry names its builders as strings), so that
``--help``, the importers and ``report`` never pay for importing torch and TorchRec; each command
imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from pathlib import Path

from cstwa_dist import __version__
from cstwa_dist.registry import MODELS, table2_models, trainable_models

logger = logging.getLogger("cstwa_dist")


def setup_logging(verbose: bool = False) -> None:
    """Rank 0 logs INFO; other ranks only warnings, so torchrun output stays readable."""
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    level = logging.DEBUG if verbose else (logging.INFO if rank == 0 else logging.WARNING)
    prefix = f"[rank {rank}/{world}] " if world > 1 else ""
    # The root logger stays at WARNING: FBGEMM and faiss log chatty INFO lines through it.
    logging.basicConfig(
        level=logging.WARNING,
        format=f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,
    )
    logging.getLogger("cstwa_dist").setLevel(level)
    for noisy in ("torchrec", "ray", "fbgemm_gpu", "torch.distributed", "faiss"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torchrec\..*")
    warnings.filterwarnings("ignore", message=".*is_fx_tracing.*")
    warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        default="configs/demo.yaml",
        help="run config YAML (default: configs/demo.yaml, the embedded default)",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a config value, e.g. --set train.epochs=2 (repeatable; value is YAML)",
    )


def cmd_synth(args: argparse.Namespace) -> int:
    from cstwa_dist.data.synth import generate, preset_with

    preset = preset_with(args.preset, conflict=args.conflict, profile_leakage=args.profile_leakage)
    _log_stats(
        generate(preset, args.scale, args.seed, args.out, rows_per_file=args.rows_per_file, name=args.preset)
    )
    return 0


def _log_stats(stats: dict) -> None:
    for split, st in stats.items():
        logger.info(
            "%s: %d rows, click %.4f, purchase %.5f, %d users, %d items",
            split,
            st.rows,
            st.click_rate,
            st.purchase_rate,
            st.users,
            st.items,
        )


def cmd_import_aliccp(args: argparse.Namespace) -> int:
    from cstwa_dist.data.aliccp import import_aliccp

    # the parallel path starts (or attaches to) a Ray runtime itself
    stats = import_aliccp(
        args.raw,
        args.out,
        min_count=args.min_count,
        fields=args.fields,
        val_fraction=args.val_fraction,
        seed=args.seed,
        strict=args.strict,
        max_quarantine_fraction=args.max_quarantine_fraction,
        parallel=args.parallel,
    )
    _log_stats(stats)
    return 0


_QUARANTINE_HELP = (
    "fail the import, writing nothing, if more than this share of any input file's (or split's) lines "
    "is quarantined (default 0.01: a sound export has no or a few stray bad lines; more means a wrong "
    "spec, vocabulary, file or format, and a data set built from the rest would be silently biased); "
    "0 fails on any bad line after the full pass, 1 never fails; the bad lines are then kept in "
    "<out>.quarantine/"
)


def cmd_import_csv(args: argparse.Namespace) -> int:
    from cstwa_dist.data.csv_import import import_csv

    stats = import_csv(
        args.train,
        args.val,
        args.test,
        args.spec,
        args.out,
        strict=args.strict,
        max_quarantine_fraction=args.max_quarantine_fraction,
    )
    _log_stats(stats)
    return 0


def cmd_entities(args: argparse.Namespace) -> int:
    from cstwa_dist.data.entities import ENTITY_SIDES, write_entity_tables
    from cstwa_dist.data.spec import DatasetSpec

    if not args.dataset.is_dir():
        raise FileNotFoundError(f"{args.dataset}: no such data set folder")
    report = write_entity_tables(args.dataset, DatasetSpec.load(args.dataset))
    for side in ENTITY_SIDES:
        r = report[side]
        logger.info(
            "%s: %d rows, %d seen, %d with conflicting profiles", side, r["rows"], r["seen"], r["conflicts"]
        )
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from cstwa_dist.config import load_config
    from cstwa_dist.distributed.env import command_runtime
    from cstwa_dist.train.pretrain import pretrain_structure

    cfg = load_config(args.config, args.overrides)
    with command_runtime(cfg.data.ray_num_cpus, cfg.train.collective_timeout_s):
        pretrain_structure(cfg)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from cstwa_dist.config import load_config
    from cstwa_dist.distributed.env import command_runtime
    from cstwa_dist.train.trainer import train

    overrides = [*args.overrides, *([f"train.resume={args.resume}"] if args.resume else [])]
    cfg = load_config(args.config, overrides)
    with command_runtime(cfg.data.ray_num_cpus, cfg.train.collective_timeout_s):
        train(cfg, args.model, run_dir=args.run_dir)
    return 0


def cmd_experiment(args: argparse.Namespace) -> int:
    from cstwa_dist.config import load_config
    from cstwa_dist.distributed.env import command_runtime
    from cstwa_dist.experiments.grid import plan_cells, run_experiment

    if args.seeds < 1:
        raise ValueError("--seeds must be >= 1")
    models = args.models.split(",") if args.models else None
    if models is None and not args.ablation and not args.sweep and not args.variant:
        models = table2_models()
    seeds = list(range(args.seed_base, args.seed_base + args.seeds))
    cells = plan_cells(models, seeds, args.ablation, args.sweep, args.variant, args.model_set)
    cfg = load_config(args.config, args.overrides)  # validates the config before any rank starts work
    with command_runtime(cfg.data.ray_num_cpus, cfg.train.collective_timeout_s):
        run_experiment(cfg, cells, args.out, args.model_set)
    return 0


def cmd_bench_train(args: argparse.Namespace) -> int:
    import torch

    from cstwa_dist.bench.train import compute_only, ranks_phase, verdict
    from cstwa_dist.config import load_config
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
        "command": "cstwa-dist " + " ".join(sys.argv[1:]),
    }
    report["verdict"] = verdict(report, baseline)
    atomic_write_json(args.out, report, sort_keys=False)
    sys.stdout.write(json.dumps({k: report[k] for k in ("model", "verdict")}, indent=2) + "\n")
    logger.info("wrote %s", args.out)
    return 0


def cmd_bench_knn(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from cstwa_dist.bench.knn import representation_dims, run_bench
    from cstwa_dist.fs import atomic_write_json
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
    if users < 1 or args.k < 1 or args.ranks < 1 or args.threads < 1:
        raise ValueError("--users, --k, --ranks and --threads must be >= 1")
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
    report["command"] = "cstwa-dist " + " ".join(sys.argv[1:])
    report["load_average_1_5_15"] = {"before": list(load_before), "after": list(os.getloadavg())}
    atomic_write_json(args.out, report, sort_keys=False)
    summary = {
        "users": users,
        "exact_s": report.get("exact", {}).get("total_s"),
        "ivf_build_s": report["ivf"]["build_s"],
        "ivf_search_s": report["ivf"]["search_s"],
        "recall_at_k": report["ivf"]["recall_at_k"],
        "peak_rss_mb_per_rank": report["ivf"]["peak_rss_mb_max"],
    }
    sys.stdout.write(json.dumps(summary, indent=2) + "\n")
    logger.info("wrote %s", args.out)
    return 0


def cmd_bench_propagate(args: argparse.Namespace) -> int:
    from cstwa_dist.bench.propagate import run_bench
    from cstwa_dist.fs import atomic_write_json

    if args.users < 1 or args.dim < 1 or args.ranks < 1 or args.threads < 1 or args.repeats < 1:
        raise ValueError("--users, --dim, --ranks, --threads and --repeats must be >= 1")
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
    report["command"] = "cstwa-dist " + " ".join(sys.argv[1:])
    atomic_write_json(args.out, report, sort_keys=False)
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
    sys.stdout.write(json.dumps(summary, indent=2) + "\n")
    logger.info("wrote %s", args.out)
    return 0


def _bench_ranks(args: argparse.Namespace, ray_address: str | None) -> dict:
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


def cmd_report(args: argparse.Namespace) -> int:
    """Prints the runs' test metrics (of each run's selected epoch) and writes reliability plots.

    Two tables: ranking (AUC, GAUC, the selected ``best_epoch`` of the run's epochs) and calibration
    (log loss, mean predicted vs observed rate, ECE). Each run dir gets ``reliability_<task>.png``
    (the decile table as ``.txt`` without matplotlib). metrics.json files from before these metrics
    show "n/a". Imports numpy only (and matplotlib for the plots), never torch.
    """
    from cstwa_dist.train.metrics import TASKS, write_reliability

    rows = []
    for d in args.runs:
        path = Path(d) / "metrics.json" if Path(d).is_dir() else Path(d)
        if not path.exists():
            logger.error("no metrics.json at %s", path)
            return 1
        rows.append((path.parent, json.loads(path.read_text())))

    def num(x: float | None, width: int) -> str:
        return f"{'n/a' if x is None else f'{x:.4f}':>{width}}"

    header = (
        f"{'model':<10} {'Click AUC':>10} {'Click GAUC':>10} {'Purchase AUC':>13} {'Purchase GAUC':>13} "
        f"{'epoch':>7} {'ranks':>6} {'samples/s':>10}  run dir"
    )
    lines = [header, "-" * len(header)]
    for run, m in rows:
        best = m.get("best_epoch")
        epoch = "?" if best is None else f"{best}/{m.get('epochs', '?')}"
        lines.append(
            f"{m['model']:<10} {num(m['click_auc'], 10)} {num(m.get('click_gauc'), 10)} "
            f"{num(m.get('purchase_auc'), 13)} {num(m.get('purchase_gauc'), 13)} {epoch:>7} "
            f"{m['world_size']:>6} {m['samples_per_s']:>10.0f}  {run}"
        )
    rules = sorted({m.get("select_epoch", "last (before selection)") for _, m in rows})
    lines += [
        f"epoch: the epoch whose test metrics are reported, of all epochs (selected by {', '.join(rules)}); "
        "GAUC: per-user AUC weighted by impressions",
        "",
    ]
    header = f"{'model':<10} " + " ".join(
        f"{t.capitalize() + ' ' + k:>{w}}"
        for t in TASKS
        for k, w in (("logloss", 16), ("pred/obs", 17), ("ECE", 12))
    )
    lines += [header, "-" * len(header)]
    for _, m in rows:
        cells = []
        for t in TASKS:
            pred, obs = m.get(f"{t}_mean_pred"), m.get(f"{t}_observed_rate")
            ratio = "n/a" if pred is None or obs is None else f"{pred:.4f}/{obs:.4f}"
            cells += [num(m.get(f"{t}_logloss"), 16), f"{ratio:>17}", num(m.get(f"{t}_ece"), 12)]
        lines.append(f"{m['model']:<10} " + " ".join(cells))
    lines.append("ECE and the reliability plots: 10 equal-count bins of predicted probability")
    sys.stdout.write("\n".join(lines) + "\n")
    for run, m in rows:
        for t in TASKS:
            try:
                out = write_reliability(m, t, run)
            except OSError as e:  # a read-only run dir still gets its table printed
                logger.warning("could not write the %s reliability plot into %s: %s", t, run, e)
                continue
            if out is not None:
                logger.info("reliability plot %s", out)
    return 0


def cmd_oracles(args: argparse.Namespace) -> int:
    """Prints (and with ``--out`` writes) the partial oracles and lookups as JSON; numpy + pyarrow only."""
    from cstwa_dist.experiments.oracles import graph_cluster_rate, partial_oracles
    from cstwa_dist.fs import atomic_write_json

    if not args.dataset.is_dir():
        raise FileNotFoundError(f"{args.dataset}: no such data set folder")
    result = {"oracles": partial_oracles(args.dataset, split=args.split)}
    if args.graph_dir is not None:
        result["graph_cluster_rate"] = graph_cluster_rate(args.graph_dir, args.dataset)
    sys.stdout.write(json.dumps(result, indent=2, sort_keys=False) + "\n")
    if args.out is not None:
        atomic_write_json(args.out, result, sort_keys=False)
        logger.info("oracles written to %s", args.out)
    return 0


def cmd_experiment_summary(args: argparse.Namespace) -> int:
    """Reads finished experiments' report.json files only (no data, no process group)."""
    from cstwa_dist.experiments.summary import load_reports, summarise

    summarise(load_reports(args.reports), args.out)
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    """Sharding dry run: no process group, no data, no table memory (the model is built on ``meta``)."""
    from cstwa_dist.config import load_config
    from cstwa_dist.planner.dryrun import dry_run, resolve_spec  # imports torch and TorchRec

    cfg = load_config(args.config, args.overrides)
    spec, source = resolve_spec(args.spec, cfg.data.dataset)
    result = dry_run(
        cfg,
        spec,
        model_name=args.model,
        world_size=args.world_size,
        gpus_per_node=args.gpus_per_node,
        hbm_gb=args.hbm_gb,
        ddr_gb=args.ddr_gb,
        spec_source=source,
    )
    sys.stdout.write(result.render())
    if args.json_out is not None:
        from cstwa_dist.fs import atomic_write_json

        atomic_write_json(args.json_out, result.to_dict(), sort_keys=False)
        logger.info("plan written to %s", args.json_out)
    return 0


def _add_quarantine_args(p: argparse.ArgumentParser, unit: str) -> None:
    """``--strict`` and ``--max-quarantine-fraction``: how both importers treat bad input."""
    p.add_argument(
        "--strict", action="store_true", help=f"fail at the first bad {unit} instead of quarantining it"
    )
    p.add_argument("--max-quarantine-fraction", type=float, default=0.01, metavar="F", help=_QUARANTINE_HELP)


def _model_list(names: list[str]) -> str:
    return "; ".join(f"{n}: {MODELS[n].description}" for n in names)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cstwa-dist",
        description="Distributed CSTWA: synthetic data, structure mining, training and evaluation of "
        "post-click conversion-rate models on TorchRec + Ray Data + Faiss. Training commands run as one "
        "process or under torchrun --nproc_per_node=N.",
    )
    parser.add_argument("--version", action="version", version=f"cstwa-dist {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "synth",
        help="generate a synthetic dataset (a test instrument, not evidence)",
        description="Write <out>/{train,val,test}/*.parquet, spec.yaml and stats.json from "
        "the generative model documented in the README.",
    )
    p.add_argument("--preset", required=True, choices=["fair", "demo", "aliccp-like", "industrial-like"])
    p.add_argument(
        "--conflict",
        choices=["none", "moderate", "strong"],
        default=None,
        help="click/purchase conflict level: net effect of click-bait on purchases over all impressions "
        "none / -1 / -2 per unit of bait (default: the preset's, i.e. none)",
    )
    p.add_argument(
        "--profile-leakage",
        type=float,
        default=None,
        help="probability that each cluster-linked profile field takes its cluster's value (default: the "
        "preset's)",
    )
    p.add_argument("--scale", type=float, default=1.0, help="multiplies rows, users and items (default 1.0)")
    p.add_argument("--seed", type=int, default=0, help="generator seed (same seed = same files)")
    p.add_argument("--out", required=True, help="output dataset directory (must not exist or be empty)")
    p.add_argument("--rows-per-file", type=int, default=None, help="rows per parquet file (default: auto)")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser(
        "import-aliccp",
        help="import raw Ali-CCP (Tianchi dataset 408) into the dataset layout (AITM protocol)",
        description="Stream sample_skeleton_{train,test}.csv and common_features_{train,test}.csv, join "
        "them, "
        "keep the single-valued fields, remap ids seen fewer than --min-count times in train to 0, split "
        "validation off train, keep the official test file. Bad lines are counted in stats.json and written "
        "with file, line and reason to <out>/quarantine/<split>.jsonl (or stop the run with --strict).",
    )
    p.add_argument(
        "--raw",
        required=True,
        type=Path,
        help="folder with sample_skeleton_{train,test}.csv and common_features_{train,test}.csv",
    )
    p.add_argument(
        "--out", required=True, type=Path, help="dataset folder to create (must not exist or be empty)"
    )
    p.add_argument(
        "--min-count", type=int, default=10, help="ids seen fewer times in train become 0 (unknown)"
    )
    p.add_argument(
        "--fields",
        nargs="+",
        default=None,
        metavar="FIELD",
        help="Ali-CCP field ids to keep (default: the AITM single-valued set of docs/method.md §6); an id "
        "not documented there is an error that lists the valid ones",
    )
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of train lines used as validation")
    p.add_argument("--seed", type=int, default=0, help="seed of the validation split")
    _add_quarantine_args(p, "line")
    p.add_argument(
        "--parallel",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="process chunks as Ray tasks (default: automatic above 512 MiB of raw input); the "
        "output is identical either way",
    )
    p.set_defaults(func=cmd_import_aliccp)

    p = sub.add_parser(
        "import-csv",
        help="import preprocessed CSV files (header: spec fields + click + purchase)",
        description="Stream three CSV files (a header of field names plus click and purchase columns) into "
        "the dataset layout, with sides and vocabulary sizes from a spec file. Bad rows are quarantined "
        "like import-aliccp's.",
    )
    for name in ("--train", "--val", "--test"):
        p.add_argument(name, required=True, type=Path, help=f"CSV file of the {name[2:]} split")
    p.add_argument(
        "--spec", required=True, type=Path, help="spec.yaml: fields, sides, vocab sizes, id fields"
    )
    p.add_argument("--out", required=True, type=Path, help="dataset folder to create")
    _add_quarantine_args(p, "row")
    p.set_defaults(func=cmd_import_csv)

    p = sub.add_parser(
        "entities",
        help="(re)write a data set's entity tables <dataset>/entities/ (for data sets written before them)",
        description="Scan the impressions of an existing data set once and write entities/user.parquet and "
        "entities/item.parquet (every id's profile: its side's fields, dense by id, plus seen) and "
        "entities/entities.json. synth and the importers write them with every new data set; training reads "
        "them by id range and fails on a data set without them, naming this command.",
    )
    p.add_argument("--dataset", required=True, type=Path, help="data set folder (with spec.yaml)")
    p.set_defaults(func=cmd_entities)

    p = sub.add_parser(
        "pretrain",
        help="pre-train the CTR MLP and build the user/item kNN graphs",
        description="Train the plain CTR MLP for structure.pretrain_epochs, read r_u and r_i "
        "out of its sharded tables, build exact Faiss kNN graphs (top-k, negatives clamped, "
        "D^-1/2 A D^-1/2) and save them to structure.graph_dir for `train`.",
    )
    _add_config_args(p)
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser(
        "train",
        help="train and evaluate one model; writes <run_dir>/metrics.json",
        description="Train a registered model with DistributedModelParallel and evaluate Click "
        "and Purchase AUC over all impressions of the eval split.",
    )
    _add_config_args(p)
    p.add_argument(
        "--model",
        required=True,
        choices=trainable_models(),
        metavar="MODEL",
        help=f"registered model: {_model_list(trainable_models())}",
    )
    p.add_argument(
        "--run-dir", default=None, help="where metrics.json goes (default: <train.run_dir>/<model>)"
    )
    p.add_argument(
        "--resume",
        default=None,
        metavar="auto|never|DIR",
        help="continue from a checkpoint: auto = the newest complete one under train.checkpoint_dir "
        "(default <run dir>/checkpoints), or a checkpoint folder (same as --set train.resume=...)",
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "experiment",
        help="the paper's experiments: Table 2 (models), Table 3 (--ablation), Figure 2 (--sweep)",
        description="Run a grid of training runs (model x overrides x seed) in one job and write "
        "<out>/report.json, <out>/report.md and, for sweeps, <out>/sweep_<param>.png. Cells whose "
        "metrics.json exists are not re-run, so a restarted experiment continues where it stopped. Run it "
        "as one process or under torchrun (launchers/torchrun.sh N experiment ...): every cell then uses "
        "N ranks. Structure (pre-training + kNN graphs) is mined once per seed and k.",
    )
    _add_config_args(p)
    p.add_argument(
        "--models",
        default=None,
        help="comma-separated registered models for Table 2 (default when no --ablation/--sweep: "
        f"{','.join(table2_models())})",
    )
    p.add_argument("--seeds", type=int, default=5, help="number of seeds per cell (default 5)")
    p.add_argument("--seed-base", type=int, default=0, help="first seed (seeds are base .. base+N-1)")
    p.add_argument(
        "--ablation", action="store_true", help="Table 3: MLP, each of SM/CP/CE alone, each pair, all three"
    )
    p.add_argument(
        "--sweep",
        action="append",
        default=[],
        metavar="PARAM=V1,V2,...",
        help="Figure 2-style sweep of CSTWA over beta, gamma, layers, k (or any section.key); repeatable",
    )
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="LABEL=MODEL:KEY=V[;KEY=V]",
        help="a named configuration of a model as its own row, e.g. "
        "'SM reading (b)=cstwa:structure.sm_reading=recomputed' (repeatable; overrides separated by ;)",
    )
    p.add_argument(
        "--model-set",
        action="append",
        default=[],
        metavar="MODEL:KEY=V[;KEY=V]",
        help="settings of one model in every cell it runs in (Table 2, ablation, sweeps, variants), e.g. "
        "its hyper-parameters chosen on validation: 'cstwa:loss.gamma=2'; other models' cells are "
        "unchanged (and reused when finished); a sweep or variant that sets the same key wins (repeatable)",
    )
    p.add_argument("--out", required=True, help="experiment directory (cells, structure, reports)")
    p.set_defaults(func=cmd_experiment)

    p = sub.add_parser(
        "bench",
        help="throughput benchmarks writing JSON (bench train)",
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
    _add_config_args(p)
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
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--ranks-phase-out", default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_bench_train)

    p = bench_sub.add_parser(
        "knn",
        help="exact vs distributed IVF kNN: build/search time, recall@k, peak memory per rank",
        description="Times exact Faiss kNN (the pretrain path: one process, IndexFlatIP; at large --users on "
        "a sample of --exact-queries queries, extrapolated linearly) against the distributed IVF kNN on "
        "--ranks spawned gloo ranks, on clustered Gaussian-mixture vectors or on --representations; writes "
        "--out JSON (docs/structure-scaling.md).",
    )
    p.add_argument("--users", type=int, default=None, help="rows N (default: all rows of --representations)")
    p.add_argument("--dim", type=int, default=45, help="width of generated vectors (default 45)")
    p.add_argument("--k", type=int, default=8, help="neighbours per row (default 8)")
    p.add_argument("--ranks", type=int, default=1, help="IVF ranks (spawned processes, gloo; default 1)")
    p.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 1,
        help="total CPU threads: exact uses all, IVF splits them over the ranks (default: all cores)",
    )
    p.add_argument("--nlist", type=int, default=0, help="IVF cells (default 0: 4·sqrt(N))")
    p.add_argument("--nprobe", type=int, default=None, help="cells searched per query (default: IVFParams')")
    p.add_argument(
        "--quantizer", choices=("flat", "hnsw"), default="flat", help="coarse quantizer (default flat)"
    )
    p.add_argument("--pq-m", type=int, default=0, help="PQ bytes per row (default 0: IVF-Flat)")
    p.add_argument(
        "--representations", default=None, metavar="FILE.npy", help="real [N, d] vectors instead of generated"
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
    p.add_argument("--repeats", type=int, default=1, help="runs per phase; the fastest is reported")
    p.add_argument("--out", required=True, help="JSON file to write")
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
    p.add_argument("--users", type=int, required=True, help="rows N of the graph and the table")
    p.add_argument("--dim", type=int, default=45, help="table width (default 45)")
    p.add_argument("--k", type=int, default=8, help="neighbours per row, self included (default 8)")
    p.add_argument("--ranks", type=int, default=1, help="sharded ranks (spawned processes, gloo; default 1)")
    p.add_argument("--layers", type=int, default=2, help="propagation layers L per timed call (default 2)")
    p.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 1,
        help="total CPU threads: single uses all, the ranks split them (default: all cores)",
    )
    p.add_argument("--seed", type=int, default=0, help="graph and table seed (default 0)")
    p.add_argument(
        "--locality",
        type=float,
        default=0.5,
        help="fraction of each row's neighbours drawn within ±2048 ids of it, the rest uniform (default 0.5; "
        "0 = ids unrelated to the representation, the worst case for the exchange)",
    )
    p.add_argument("--repeats", type=int, default=3, help="timed calls per phase; the fastest is reported")
    p.add_argument(
        "--single-max-users",
        type=int,
        default=2_000_000,
        help="skip the single-process phase above this many rows (default 2000000)",
    )
    p.add_argument("--out", required=True, help="JSON file to write")
    p.set_defaults(func=cmd_bench_propagate)

    p = sub.add_parser(
        "report", help="print the Click/Purchase AUC, GAUC and calibration tables of finished runs"
    )
    p.add_argument("runs", nargs="+", help="run directories (or metrics.json files)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser(
        "oracles",
        help="partial oracles and per-item lookups of a data set (AUC/GAUC), and the graphs' cluster rate",
        description="On the test split: Click/Purchase AUC and GAUC of the true click and purchase "
        "probabilities and of the user-item affinity (synthetic data only: from synth.json) and of the "
        "smoothed per-item train CTR and purchase-rate lookups (any data set); with --graph-dir, the share "
        "of the mined kNN graphs' neighbours in the same true cluster. Prints JSON; nothing is written into "
        "the data set.",
    )
    p.add_argument("--dataset", required=True, type=Path, help="data set folder")
    p.add_argument(
        "--graph-dir", type=Path, default=None, help="a structure.graph_dir written by pretrain (optional)"
    )
    p.add_argument("--split", choices=["val", "test"], default="test", help="evaluated split (default test)")
    p.add_argument("--out", type=Path, default=None, metavar="FILE", help="also write the JSON here")
    p.set_defaults(func=cmd_oracles)

    p = sub.add_parser(
        "experiment-summary",
        help="one table and plot across experiments (e.g. one per conflict level): Purchase AUC per model",
        description="Reads the report.json of each experiment directory and writes summary.md, summary.json "
        "and purchase_vs_conflict.png under --out: per level every Table 2 / Table 3 row's Purchase AUC "
        "(mean ± std), its paired difference against that level's best baseline, whether it beats both "
        "per-item lookups, and the partial oracles and graph cluster rates beside them.",
    )
    p.add_argument(
        "reports",
        nargs="+",
        metavar="LABEL=DIR",
        help="experiment directories in plot order, each labelled (e.g. none=runs/fair/none)",
    )
    p.add_argument("--out", required=True, type=Path, help="folder for summary.md / .json / .png")
    p.set_defaults(func=cmd_experiment_summary)

    p = sub.add_parser(
        "plan",
        help="sharding dry run: the plan and per-rank memory at a world size, without training",
        description="Build the model on the meta device, plan its embedding tables with TorchRec's planner "
        "for --world-size ranks (no process group, no data, no GPU needed) and print every table's "
        "sharding type, kernel, ranks and bytes, then per rank: embedding storage, dense state and the "
        "row-sharded structure steps' peaks (mining in pretrain, the β update in train; formulas included).",
    )
    _add_config_args(p)
    p.add_argument("--world-size", type=int, required=True, help="number of ranks to plan for")
    p.add_argument(
        "--gpus-per-node",
        type=int,
        default=0,
        help="plan CUDA ranks, this many per node (default 0: CPU ranks on one node)",
    )
    p.add_argument("--hbm-gb", type=float, default=None, help="HBM per GPU in GiB (default: TorchRec's 32)")
    p.add_argument(
        "--ddr-gb", type=float, default=None, help="host memory per rank in GiB (default: TorchRec's 128)"
    )
    p.add_argument(
        "--model",
        default="cstwa",
        choices=sorted(MODELS),
        metavar="MODEL",
        help=f"registered model (default cstwa): {', '.join(sorted(MODELS))}",
    )
    p.add_argument(
        "--spec",
        default=None,
        help="spec.yaml or dataset folder, or synth:PRESET[:SCALE] (default: <data.dataset>/spec.yaml, "
        "else the synth preset that folder is named after, e.g. data/industrial-like)",
    )
    p.add_argument(
        "--json",
        dest="json_out",
        type=Path,
        default=None,
        metavar="FILE",
        help="also write the report as JSON",
    )
    p.set_defaults(func=cmd_plan)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError) as e:  # user errors: one clear line, no trace
        logger.error("%s: %s", type(e).__name__, e)
        return 2


if __name__ == "__main__":
    sys.exit(main())
