"""The dry run's plain-text report: tables, per-rank memory, the structure step's terms and formulas.

Why apart from the planning: what is printed changes more often than what is planned, and a reader
looking for a figure's origin should find the arithmetic (``dryrun.py``, ``structure.py`` and the steps'
own functions), not the column widths.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cstwa_dist.structure.estimate import StructureEstimate

if TYPE_CHECKING:
    from cstwa_dist.distributed.sharding import Reserve
    from cstwa_dist.planner.dryrun import DryRun
    from cstwa_dist.planner.verdict import NoPlan

__all__ = ["GIB", "fmt_bytes", "render_dry_run", "render_no_plan"]

GIB = 1024**3


def fmt_bytes(b: float) -> str:
    """Human-readable binary size: 1.50 GiB, 312.0 MiB, 4.0 KiB, 12 B."""
    for unit, size in (("TiB", 1024**4), ("GiB", GIB), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(b) >= size:
            return f"{b / size:.2f} {unit}" if unit in ("TiB", "GiB") else f"{b / size:.1f} {unit}"
    return f"{int(b)} B"


def _ranks_text(ranks: list[int]) -> str:
    if len(ranks) <= 4:
        return ",".join(map(str, ranks))
    return f"{ranks[0]}..{ranks[-1]} ({len(ranks)})"


def render_dry_run(d: DryRun) -> str:
    """The plain-text report of a dry run: tables, ranks, the structure step's phases."""
    nodes = d.world_size // d.local_world_size
    if d.compute_device == "cuda":
        topo = (
            f"{d.world_size} ranks = {nodes} node(s) x {d.local_world_size} GPUs, "
            f"HBM {fmt_bytes(d.hbm_cap)} per GPU, host {fmt_bytes(d.ddr_cap)} per rank"
        )
    else:
        topo = f"{d.world_size} CPU ranks, host {fmt_bytes(d.ddr_cap)} per rank"
    opt = d.embedding_optimizer_settings
    lines = [
        f"sharding dry run: model {d.model}, spec from {d.spec_source}",
        f"topology: {topo}",
        f"embedding optimizer: fused {d.embedding_optimizer} ({opt['kernel']}, lr {opt['lr']:g}, "
        f"eps {opt['eps']:g}; state {opt['state']}); dense: Adam; "
        f"batch {d.batch_size} per rank; planned in {d.plan_seconds:.2f}s",
        "",
        f"embedding tables ({len(d.tables)}); bytes = weights + optimizer state",
    ]
    rows = [("table", "rows x dim", "sharding", "kernel", "ranks", "bytes")]
    for t in d.tables:
        rows.append(
            (
                t.name,
                f"{t.rows:,} x {t.dim}",
                t.sharding_type,
                t.compute_kernel,
                _ranks_text(t.ranks),
                fmt_bytes(t.bytes),
            )
        )
    rows.append(("total", "", "", "", "", fmt_bytes(d.total_embedding_bytes)))
    lines += _table(rows, right={1, 5})

    cuda = d.compute_device == "cuda"
    lines += [
        "",
        "per rank: emb w+opt = this rank's shards, weights + optimizer state; "
        f"plan {'HBM' if cuda else 'DDR'} = the planner's storage for them (adds input/output buffers);",
        f"  dense = {fmt_bytes(d.dense_params)} of dense weights x 4 (weights, grads, Adam's 2 moments) on "
        "every rank; struct = the structure step's peak (below); eval = an evaluation pass (host); "
        "totals leave out the process itself (torch, CUDA context) and the node's Ray runtime"
        + ("" if cuda else ", its device transients included (host memory on CPU ranks)"),
    ]
    header: tuple[str, ...] = ("rank", "tables", "emb w+opt")
    if cuda:
        header += (
            "plan HBM",
            "dense",
            "struct dev",
            "device total",
            "plan DDR",
            "struct host",
            "eval",
            "host total",
        )
    else:
        header += ("plan DDR", "dense", "struct host", "eval", "host total")
    rows = [header]
    over_device = over_host = 0
    for r in d.ranks:
        dflag = "!" if cuda and r.device_total > d.hbm_cap else ""
        hflag = "!" if r.host_total > d.ddr_cap else ""
        over_device += bool(dflag)
        over_host += bool(hflag)
        row: tuple[str, ...] = (
            str(r.rank),
            (",".join(r.tables) if len(r.tables) <= 2 else f"{len(r.tables)} tables") or "-",
            fmt_bytes(r.embedding_bytes),
        )
        if cuda:
            row += (
                fmt_bytes(r.plan_hbm),
                fmt_bytes(r.dense_bytes),
                fmt_bytes(r.structure_device),
                fmt_bytes(r.device_total) + dflag,
                fmt_bytes(r.plan_ddr),
                fmt_bytes(r.structure_host),
                fmt_bytes(r.evaluation_bytes),
            )
        else:
            row += (
                fmt_bytes(r.plan_ddr),
                fmt_bytes(r.dense_bytes),
                fmt_bytes(r.structure_host),
                fmt_bytes(r.evaluation_bytes),
            )
        row += (fmt_bytes(r.host_total) + hflag,)
        rows.append(row)
    lines += _table(rows, right=set(range(2, len(header))))
    per_node = d.local_world_size
    node_host = max(
        sum(r.host_total for r in d.ranks[i : i + per_node]) for i in range(0, d.world_size, per_node)
    )
    if cuda:
        worst = max(d.ranks, key=lambda r: r.device_total)
        lines.append(
            f"  largest device total: rank {worst.rank}, {fmt_bytes(worst.device_total)} of "
            f"{fmt_bytes(d.hbm_cap)}; ranks over the HBM cap: {over_device}"
        )
    worst = max(d.ranks, key=lambda r: r.host_total)
    lines.append(
        f"  largest host total: rank {worst.rank}, {fmt_bytes(worst.host_total)} of {fmt_bytes(d.ddr_cap)}; "
        f"ranks over the host cap: {over_host}; busiest node ({per_node} ranks): {fmt_bytes(node_host)} host"
    )
    lines += ["", *reserve_lines(d.reserves, cuda, d.eval_rows)]
    least = min(d.ranks, key=lambda r: r.table_capacity)
    lines.append(
        f"  the planner could give tables at most {fmt_bytes(least.table_capacity)} "
        f"{'HBM' if cuda else 'host memory'} on rank {least.rank} (cap less 15 % on HBM, 6 x the dense "
        "parameters, input buffers and the reserves)"
    )

    lines += [
        "",
        "structure step, row-sharded: a rank holds n_r = ceil(N/W) rows of each side (its shard of U/I,",
        "counted above by the planner; its rows of Â; its block of representations) and the foreign rows",
        "it fetches or serves (f_r <= min(n_r·k, N − n_r)); nothing of size N",
    ]
    lines += _structure_lines(d.structure, "this job")
    if d.mining.phase != "none" and d.mining is not d.structure:
        lines += _structure_lines(d.mining, "before it, `pretrain`")
    if d.knn_madds_per_rank:
        lines.append(
            f"  kNN per rank (largest side, ring over {d.world_size} ranks): {d.knn_madds_per_rank:.2e} "
            f"multiply-adds; exact search through the ring N·n_r·w = {d.exact_knn_madds_per_rank:.2e}"
        )
    # what `cstwa-dist export` writes and a serving replica loads (cstwa_dist/export/weight.py)
    if d.export_line:
        lines += ["", d.export_line]
    return "\n".join(lines) + "\n"


def render_no_plan(e: NoPlan) -> str:
    """The report when TorchRec's planner found no plan: the topology and every table's demand, the
    ones larger than a rank's usable memory marked ``!`` (the verdict line follows)."""
    if e.compute_device == "cuda":
        topo = (
            f"{e.world_size} ranks = {e.world_size // e.local_world_size} node(s) x "
            f"{e.local_world_size} GPUs, "
            f"HBM {fmt_bytes(e.hbm_cap)} per GPU, host {fmt_bytes(e.ddr_cap)} per rank"
        )
    else:
        topo = f"{e.world_size} CPU ranks, host {fmt_bytes(e.ddr_cap)} per rank"
    lines = [
        f"sharding dry run: no plan ({e.reason})",
        f"topology: {topo}",
        "",
        f"embedding tables ({len(e.demands)}); bytes = weights + optimizer state; per rank = the least one "
        "rank holds (row-wise: ceil(rows/W) rows; table-wise: all of it); usable = 85 % of the cap less "
        "6 x the dense parameters and the steps' reserves (the planner's reservation)",
    ]
    big = {t.name for t in e.too_big()}
    rows = [("table", "rows x dim", "sharding", "bytes", "per rank", "usable")]
    for t in e.demands:
        cap, where = e.usable(t)
        flag = "!" if t.name in big else ""
        rows.append(
            (
                t.name,
                f"{t.rows:,} x {t.dim}",
                t.sharding_type,
                fmt_bytes(t.bytes),
                fmt_bytes(t.per_rank) + flag,
                f"{fmt_bytes(cap)} {where}",
            )
        )
    rows.append(("total", "", "", fmt_bytes(sum(t.bytes for t in e.demands)), "", ""))
    lines += _table(rows, right={1, 3, 4})
    if e.reserves:
        lines += ["", *reserve_lines(e.reserves, e.compute_device == "cuda")]
    return "\n".join(lines) + "\n"


def reserve_lines(reserves: list[Reserve], cuda: bool, eval_rows: int | None = -1) -> list[str]:
    """One line per reserve the planner kept from the tables on every rank, with its size and the
    function its figure comes from (``train/reserves.py``); ``eval_rows=None`` says that the
    evaluation reserve is missing because no split sizes were known."""
    out = [f"reserves kept from the planner on every rank ({len(reserves)}):"]
    for r in reserves:
        host = fmt_bytes(r.ddr) + (f" (rank 0: {fmt_bytes(r.ddr_rank0)})" if r.ddr_rank0 != r.ddr else "")
        where = f"device {fmt_bytes(r.hbm)}, host {host}" if cuda else f"host {host}"
        out.append(f"  reserve: {r.name}: {where}  [{r.source}]")
    if eval_rows is None:
        out.append(
            "  reserve: evaluation: none (split rows unknown: no stats.json beside this spec, "
            "not a synth preset)"
        )
    return out


def _structure_lines(s: StructureEstimate, title: str) -> list[str]:
    if s.phase == "none":
        return [f"  {title}: this model reads no graphs, no structure step"]
    what = "SM initialisation + epoch-boundary β update" if s.phase == "train" else "graph mining"
    out = [f"  {title}: {what}, row-sharded over {s.world_size} rank(s)"]
    for x in s.sides:
        n_r, f_r = x.rows_per_rank(s.world_size), x.foreign_rows(s.world_size)
        out.append(
            f"    {x.side}: N={x.entities:,} n_r={n_r:,} M={x.fields} w={x.width} k={x.k} f_r<={f_r:,}"
        )
    out += [f"    {f}" for f in s.formulas]
    peaks = {"device": s.device, "host": s.host_rank0}
    rows: list[tuple[str, ...]] = [("where", "term", "formula", "bytes", "share")]
    for t in s.terms:
        share = 100 * t.bytes / peaks[t.where] if peaks[t.where] else 0.0
        name = t.name + (" [rank 0 only]" if t.rank0_only else "")
        rows.append((t.where, name, t.formula, fmt_bytes(t.bytes), f"{share:.1f} %"))
    out += ["  " + line for line in _table(rows, right={3, 4})]
    host = (
        f"host {fmt_bytes(s.host_rank0)} on every rank"
        if s.host_rank0 == s.host_other
        else f"host {fmt_bytes(s.host_rank0)} on rank 0, {fmt_bytes(s.host_other)} on the others"
    )
    device = f"device {fmt_bytes(s.device)} per rank; " if s.device else ""
    out.append(f"    peak: {device}{host} (shares: of that peak, rank 0)")
    out.append(f"    dominant term: {s.dominant}")
    out += [f"    note: {n}" for n in s.notes]
    return out


def _table(rows: list[tuple[str, ...]], right: set[int]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]

    def line(r: tuple[str, ...]) -> str:
        cells = [
            c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ]
        return "  " + "  ".join(cells).rstrip()

    out = [line(rows[0]), "  " + "  ".join("-" * w for w in widths)]
    out += [line(r) for r in rows[1:]]
    return out
