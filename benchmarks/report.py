"""Turning pp_tp_latency records into comparisons, target verdicts, a text table, a
verdict in words, the JSON result file and (when matplotlib is importable) a plot.

Pure functions over the list of records that runners.run_configuration returns;
nothing here runs a step. Ratios compare medians of the same (workload, PP, TP,
payload) cell: `rpc/dag` > 1 means the DAG is that many times faster, `dag/floor`
how far the DAG is from the no-Ray floor, `overhead` = (dag - local) / dag.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

Record = dict[str, Any]
KIB, MIB = 1 << 10, 1 << 20


def _value(rows: list[Record], metric: str, workload: str, pp: int, tp: int,
           payload: int | None = None) -> float | None:
    """`metric` of the first row of that cell (any payload when None)."""
    for r in rows:
        if (r["workload"], r["pp"], r["tp"]) == (workload, pp, tp) and r.get(metric) is not None \
                and (payload is None or r["payload_bytes"] == payload):
            return r[metric]
    return None


def _dag_ratio(rows: list[Record], big: int, small: int) -> float | None:
    return _ratio(_value(rows, "dag_median_us", "echo", 2, 2, big),
                  _value(rows, "dag_median_us", "echo", 2, 2, small))


def _worst_over_bare(rows: list[Record], key: str = "dag_over_bare") -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return max(values) if values else None


# (name, what it means to a user, (pp, tp) it runs at, value from the rows, op,
# threshold); the rows are those of the run's default channel (first of --channels).
TARGETS = (
    ("dag >= 5x faster than rpc, echo 4 KiB, PP=2 x TP=2",
     "a small (4 KiB) PP=2 x TP=2 step through the compiled graph costs at most a fifth "
     "of the same step as plain Ray actor calls",
     (2, 2), lambda rows: _value(rows, "rpc_over_dag", "echo", 2, 2, 4 * KIB), ">=", 5.0),
    ("dag >= 5x faster than rpc, echo 64 KiB, PP=2 x TP=2", "the same for a 64 KiB step",
     (2, 2), lambda rows: _value(rows, "rpc_over_dag", "echo", 2, 2, 64 * KIB), ">=", 5.0),
    ("dag >= 5x faster than rpc, echo 1 MiB, PP=2 x TP=2", "the same for a 1 MiB step",
     (2, 2), lambda rows: _value(rows, "rpc_over_dag", "echo", 2, 2, MIB), ">=", 5.0),
    ("no cliff: dag(64 KiB) <= 1.5x dag(4 KiB), echo PP=2 x TP=2",
     "a 16x larger step (64 KiB) costs at most 1.5x a 4 KiB one: no jump where the "
     "payload changes paths", (2, 2), lambda rows: _dag_ratio(rows, 64 * KIB, 4 * KIB), "<=", 1.5),
    ("dag within 3x of floor, echo 1 MiB, PP=2 x TP=2",
     "a 1 MiB PP=2 x TP=2 step costs at most 3x a hand-written pipeline of plain processes "
     "over shared memory (no Ray)",
     (2, 2), lambda rows: _value(rows, "dag_over_floor", "echo", 2, 2, MIB), "<=", 3.0),
    ("dag within 1.1x of the best bare Ray graph, every echo cell",
     "rayexec adds at most 10% to what the same chain costs as a plain Ray compiled graph "
     "(its fastest variant), in every layout and payload measured",
     (2, 2), _worst_over_bare, "<=", 1.1),
    ("model overhead (dag - local) < 25% of the step, PP=2 x TP=1",
     "in a real decode step (PP=2 x TP=1), under a quarter of the time is spent outside the "
     "model's compute",
     (2, 1), lambda rows: _value(rows, "dag_overhead_frac", "model", 2, 1), "<", 0.25),
)
MEANINGS = tuple(target[1] for target in TARGETS)
DOCS = "docs/benchmarks.md"


def human_bytes(n: int) -> str:
    for unit, size in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{n // size} {unit}"
    return f"{n} B"


def _cell(r: Record) -> tuple[str, int, int, int]:
    return r["workload"], r["pp"], r["tp"], r["payload_bytes"]


def compare(records: Iterable[Record]) -> list[Record]:
    """One row per cell and DAG channel: every mode's median and the ratios."""
    cells: dict[tuple, dict[str, Record]] = {}
    dag_channels: dict[tuple, list[str]] = {}
    for r in records:
        key = _cell(r)
        if r["mode"] == "dag":
            dag_channels.setdefault(key, []).append(r["channel"])
            cells.setdefault(key, {})[f"dag:{r['channel']}"] = r
        elif r["mode"] == "bare":
            cells.setdefault(key, {})[f"bare:{r['channel']}"] = r
        else:
            cells.setdefault(key, {})[r["mode"]] = r
    rows = []
    for key, modes in cells.items():
        for channel in dag_channels.get(key, [None]):
            dag = modes.get(f"dag:{channel}")
            row: Record = dict(zip(("workload", "pp", "tp", "payload_bytes"), key))
            row["channel"] = channel
            by_mode = {"dag": dag, "rpc": modes.get("rpc"), "floor": modes.get("floor"),
                       "local": modes.get("local")}
            for mode, r in by_mode.items():
                row[f"{mode}_median_us"] = r["median_us"] if r else None
            bares = {m.split(":", 1)[1]: r["median_us"] for m, r in modes.items()
                     if m.startswith("bare:")}
            best = min(bares, key=bares.get) if bares else None
            row["bare_median_us"] = bares[best] if best else None
            row["bare_variant"] = best
            row["bare_medians_us"] = bares
            row["dag_over_bare"] = _ratio(row["dag_median_us"], row["bare_median_us"])
            # The bare chain that does rayexec's work (a tensor into and out of every
            # stage): what is left above it is rayexec's own code.
            row["dag_over_bare_tensor"] = _ratio(row["dag_median_us"], bares.get("tensor"))
            row["dag_p99_us"] = dag["p99_us"] if dag else None
            row["dag_mb_per_s"] = dag.get("mb_per_s") if dag else None
            med = {m: row[f"{m}_median_us"] for m in by_mode}
            row["dag_over_rpc"] = _ratio(med["dag"], med["rpc"])
            row["rpc_over_dag"] = _ratio(med["rpc"], med["dag"])
            row["dag_over_floor"] = _ratio(med["dag"], med["floor"])
            for mode in ("dag", "rpc", "floor"):
                # echo does no compute: time "outside the compute" is the whole step
                over = None if med[mode] is None or med["local"] is None \
                    or row["workload"] == "echo" else med[mode] - med["local"]
                row[f"{mode}_overhead_us"] = over
                row[f"{mode}_overhead_frac"] = _ratio(over, med[mode])
            rows.append(row)
    rows.sort(key=lambda r: (r["workload"], r["pp"] * r["tp"], r["pp"], r["tp"],
                             r["payload_bytes"], r["channel"] or ""))
    return rows


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def evaluate_targets(rows: list[Record], channel: str | None = None) -> list[Record]:
    """The targets with the measured value; met=None when not measured. `channel`: the
    DAG channel whose rows count (default: every row)."""
    rows = [r for r in rows if channel is None or r.get("channel") in (channel, None)]
    verdicts = []
    for name, meaning, (pp, tp), measure, op, threshold in TARGETS:
        value = measure(rows)
        met = None if value is None else {">=": value >= threshold, "<=": value <= threshold,
                                          "<": value < threshold}[op]
        verdict = {"name": name, "value": value, "op": op, "threshold": threshold,
                   "met": met, "meaning": meaning, "metric": "frac" if threshold < 1 else "ratio",
                   "processes": pp * tp + 1}  # the workers and the driver
        if measure is _worst_over_bare:
            verdict["same_work"] = _worst_over_bare(rows, "dag_over_bare_tensor")
        if name.startswith("model overhead"):
            # The no-Ray pipeline of the same workers: what splitting the model into
            # processes costs here before Ray or rayexec add anything.
            verdict["floor_frac"] = _value(rows, "floor_overhead_frac", "model", pp, tp)
            verdict["dag_over_floor"] = _value(rows, "dag_over_floor", "model", pp, tp)
        verdicts.append(verdict)
    return verdicts


def why_missed(verdict: Record, cores: int) -> str:
    """One line on the likely cause of a missed target on this machine."""
    if "bare" in verdict["name"]:
        same = verdict.get("same_work")
        if same is None:
            return (f"the plain Ray graph runs the same processes on the same cores, so the "
                    f"difference is rayexec's own per-step work; see {DOCS}")
        lead = (f"against the bare variant that does rayexec's work (`tensor`: a tensor into "
                f"and out of every stage, as an engine needs), dag is at most {same:.2f}x")
        if same <= verdict["threshold"]:
            return (f"{lead}, so the rest of the gap is turning bytes into tensors and back, "
                    f"which any executor of an engine pays, not rayexec's own code; see {DOCS}")
        return f"{lead}, and that much is rayexec's own per-step work; see {DOCS}"
    floor_frac, over_floor = verdict.get("floor_frac"), verdict.get("dag_over_floor")
    if floor_frac is not None and over_floor is not None:
        lead = (f"the no-Ray pipeline of the same workers (floor) spends {floor_frac:.0%} of "
                f"its step outside the compute here, and dag is {over_floor:.2f}x the floor")
        if floor_frac >= verdict["threshold"]:
            return (f"{lead}: splitting the model into processes on {cores} core(s) costs "
                    f"that much without Ray or rayexec; see {DOCS}")
        return (f"{lead}: the part above the floor is Ray's and rayexec's hand-offs; "
                f"see {DOCS}")
    processes = verdict["processes"]
    if processes > cores:
        return (f"{processes} processes (the workers and the driver) share {cores} core(s); "
                f"Ray's compiled-graph readers poll while they wait, so each hand-off waits "
                f"for a core; see {DOCS}")
    return f"not the known cause (a core for each process here); see {DOCS}"


def format_verdict(verdicts: list[Record], cores: int, load: float | None = None) -> str:
    """The run's conclusion in words: each target's meaning, met or not, and why not.
    `load`: the highest 1-minute load average seen; above `cores`, other work shared
    the machine and the verdict says the numbers are not to be trusted."""
    measured = [v for v in verdicts if v["met"] is not None]
    met = sum(v["met"] is True for v in measured)
    lines = [f"verdict: {met} of {len(measured)} measured targets met on this machine "
             f"({cores} core(s) available)"]
    if load is not None and load > cores:
        lines.append(f"  caution: the machine was busy with other work (load average up to "
                     f"{load:.1f} on {cores} cores), so these numbers, met or missed, say "
                     f"little; run again on a quiet machine")
    for v in verdicts:
        state = {True: "met", False: "MISSED", None: "not measured"}[v["met"]]
        value = "" if v["value"] is None else f" (measured {_fmt_metric(v)})"
        lines.append(f"  {state}: {v['meaning']}{value}")
        if v["met"] is False:
            lines.append(f"    why: {why_missed(v, cores)}")
    if len(measured) < len(verdicts):
        lines.append("  (a target is measured only when its layout and payload are in the run; "
                     "the plain command runs them all)")
    return "\n".join(lines)


def _fmt_metric(v: Record) -> str:
    if v["metric"] == "frac":
        return f"{100 * v['value']:.0f}%, target {v['op']} {100 * v['threshold']:g}%"
    return f"{v['value']:.1f}x, target {v['op']} {v['threshold']:g}x"


def _fmt(value: float | None, spec: str = ".0f", suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def format_table(rows: list[Record]) -> str:
    """Medians in microseconds, side by side, with the ratios."""
    head = ("workload", "PPxTP", "payload", "chan", "local", "floor", "rpc", "bare", "dag",
            "dag p99", "dag MB/s", "rpc/dag", "dag/floor", "dag/bare", "dag/tensor", "overhead")
    lines = [head]
    for r in rows:
        lines.append((
            r["workload"], f"{r['pp']}x{r['tp']}", human_bytes(r["payload_bytes"]),
            r["channel"] or "-", _fmt(r["local_median_us"]), _fmt(r["floor_median_us"]),
            _fmt(r["rpc_median_us"]),
            "-" if r["bare_median_us"] is None else
            f"{r['bare_median_us']:.0f} ({r['bare_variant']})",
            _fmt(r["dag_median_us"]), _fmt(r["dag_p99_us"]),
            _fmt(r["dag_mb_per_s"]) if r["workload"] == "echo" else "",
            _fmt(r["rpc_over_dag"], ".1f", "x"), _fmt(r["dag_over_floor"], ".1f", "x"),
            _fmt(r["dag_over_bare"], ".2f", "x"), _fmt(r.get("dag_over_bare_tensor"), ".2f", "x"),
            # echo does no compute, so "time outside the compute" says nothing there
            "" if r["workload"] == "echo" else _fmt(
                None if r["dag_overhead_frac"] is None else 100 * r["dag_overhead_frac"],
                ".0f", "%"),
        ))
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(head))]
    out = []
    for n, line in enumerate(lines):
        out.append("  ".join(str(v).rjust(w) if i > 3 else str(v).ljust(w)
                             for i, (v, w) in enumerate(zip(line, widths))))
        if n == 0:
            out.append("-" * len(out[0]))
    out.append("medians in us; bare = the same chain as a plain Ray compiled graph (its "
               "fastest variant); rpc/dag = how many times faster the DAG is; dag/floor = how "
               "far from the no-Ray floor; dag/bare = dag over the fastest plain Ray graph; "
               "dag/tensor = dag over the bare variant that hands every stage a tensor (the "
               "same work); overhead = (dag - local) / dag, model rows only")
    return "\n".join(out)


def write_json(path: Path, document: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(document, indent=1, default=str) + "\n")
    tmp.replace(path)  # never leave a half-written result file


PLOT_MISSING = ("no plot: matplotlib is not installed; pip install -e '.[plot]' (or pip "
                "install matplotlib) and run again to get it")


def plot(records: list[Record], path: Path) -> str | None:
    """Latency vs payload (echo) and vs PP (TP=1) per mode. None when written, else
    why not (matplotlib missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return PLOT_MISSING

    colors = {"dag": "tab:blue", "rpc": "tab:red", "floor": "tab:orange", "local": "tab:green"}
    markers = iter("osD^v<>")
    dag_markers: dict[str, str] = {}

    def label(r: Record) -> str:
        return f"dag ({r['channel']})" if r["mode"] == "dag" else r["mode"]

    def style(name: str) -> dict[str, str]:
        mode = name.split(" ")[0]
        marker = dag_markers.setdefault(name, next(markers, "o")) if mode == "dag" else "o"
        return {"color": colors.get(mode, "black"), "marker": marker}

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    echo = [r for r in records if r["workload"] == "echo"]
    layouts = sorted({(r["pp"], r["tp"]) for r in echo}, key=lambda c: (c != (2, 2), -c[0] * c[1]))
    if layouts:
        pp, tp = layouts[0]
        series: dict[str, list[tuple[int, float]]] = {}
        for r in echo:
            if (r["pp"], r["tp"]) == (pp, tp):
                series.setdefault(label(r), []).append((r["payload_bytes"], r["median_us"]))
        for name, points in sorted(series.items()):
            xs, ys = zip(*sorted(points))
            left.plot(xs, ys, label=name, **style(name))
        left.set(xscale="log", yscale="log", xlabel="payload (bytes)", ylabel="median step (us)",
                 title=f"echo, PP={pp} x TP={tp}")
        left.legend()
    tp1 = [r for r in records if r["tp"] == 1]
    payloads = sorted({r["payload_bytes"] for r in tp1 if r["workload"] == "echo"})
    mid = payloads[len(payloads) // 2] if payloads else None
    for workload, line in (("echo", "-"), ("model", "--")):
        series = {}
        for r in tp1:
            if r["workload"] == workload and (workload == "model" or r["payload_bytes"] == mid):
                series.setdefault(label(r), []).append((r["pp"], r["median_us"]))
        for name, points in sorted(series.items()):
            xs, ys = zip(*sorted(points))
            what = f"echo {human_bytes(mid)}" if workload == "echo" else "model"
            right.plot(xs, ys, linestyle=line, label=f"{what}: {name}", **style(name))
    right.set(yscale="log", xlabel="PP (TP=1)", ylabel="median step (us)", title="vs PP",
              xticks=sorted({r["pp"] for r in tp1}))
    right.legend(fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None
