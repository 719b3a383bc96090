"""Summaries, targets, tables and charts from the raw per-repetition results.

Every figure is a median over repetitions. Ratios between two systems are taken *within*
a repetition (the two were measured seconds apart, in the same run) and then the median
of those ratios is reported. Latency ratios are normalised by each runner's own in-runner
floor first, which cancels most of the machine's fast/slow wake-up state
(see ``benchmarks/README.md``).
"""

from __future__ import annotations

import statistics
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .systems import FLOORS, NOT_PYTHON, OFFLOAD, PREVIOUS_OFFLOAD

Results = dict[str, dict[str, dict[int, dict[str, Any]]]]  # scenario -> system -> rep -> result


def _med(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def index(raw: list[dict[str, Any]]) -> Results:
    out: Results = defaultdict(lambda: defaultdict(dict))
    for entry in raw:
        if "result" in entry:
            out[entry["scenario"]][entry["system"]][entry["rep"]] = entry["result"]
    return out


def base(name: str) -> str:
    """A row's system name without the ``@python`` suffix of merged runs."""
    return name.split("@", 1)[0]


def is_peer(name: str) -> bool:
    name = base(name)
    return name not in FLOORS and name not in OFFLOAD and name not in PREVIOUS_OFFLOAD


def is_python_peer(name: str) -> bool:
    return is_peer(name) and base(name) not in NOT_PYTHON


def _interpreter_kind(name: str) -> bool:
    name = base(name)
    return "interpreter" in name or name == "InterpreterPoolExecutor"


def python_floor_of(name: str) -> str:
    """The Python floor of the same kind: what a system's round trip is held against."""
    return "python-floor-interpreter" if _interpreter_kind(name) else "python-floor"


def previous_of(name: str) -> str | None:
    """The previous release's row for one of offload's asyncio rows (issue 12 section 5)."""
    return {
        "offload-process": "offload-previous",
        "offload-interpreter": "offload-previous-interpreter",
    }.get(name)


def _get(result: dict[str, Any], key: str) -> Any:
    cur: Any = result
    for part in key.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return cur


def weighted_pct(lags_ms: list[float], q: float, period_ms: float = 1.0) -> float | None:
    """The lag a moment picked at random would meet, at percentile ``q``: each tick's lag
    weighted by how long that tick lasted (``period + lag``). A ticker sees a 200 ms stall as
    one sample among hundreds; weighted, it counts for the 200 ms it blocked the loop."""
    if not lags_ms:
        return None
    pairs = sorted(lags_ms)
    total = sum(lag + period_ms for lag in pairs)
    acc = 0.0
    for lag in pairs:
        acc += lag + period_ms
        if acc >= q / 100.0 * total:
            return lag
    return pairs[-1]


def _metric(res: Results, scenario: str, system: str, key: str) -> float | None:
    return _med([_get(r, key) for r in res[scenario][system].values()])


def _norm_latency(r: dict[str, Any]) -> float | None:
    if r.get("median_us") and r.get("floor_median_us"):
        return r["median_us"] / r["floor_median_us"]
    return None


def _ratio(
    res: Results,
    scenario: str,
    a: str,
    b: str,
    value: Callable[[dict[str, Any]], float | None],
) -> float | None:
    """Median over repetitions of value(a) / value(b), pairing the same repetition."""
    ra, rb = res[scenario].get(a, {}), res[scenario].get(b, {})
    ratios = []
    for rep in ra.keys() & rb.keys():
        va, vb = value(ra[rep]), value(rb[rep])
        if va is not None and vb:
            ratios.append(va / vb)
    return _med(ratios)


def _key(key: str) -> Callable[[dict[str, Any]], float | None]:
    return lambda r: _get(r, key)


def _best_peer(
    res: Results, scenario: str, key: str, higher: bool, python_only: bool = False
) -> str | None:
    peer = is_python_peer if python_only else is_peer
    scored = [
        (v, s)
        for s in res[scenario]
        if peer(s) and (v := _metric(res, scenario, s, key)) is not None
    ]
    if not scored:
        return None
    return (max if higher else min)(scored)[1]


def _majority(values: list[Any]) -> Any:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return Counter(values).most_common(1)[0][0]


# --------------------------------------------------------------------------- summary


def summarise(
    raw: list[dict[str, Any]], imports: list[dict[str, Any]], contended: float = 0.10
) -> dict[str, Any]:
    """The tables' figures; rows measured while other processes used more than
    ``contended`` of the CPUs (in any repetition) carry ``contended_reps``."""
    res = index(raw)
    summary: dict[str, Any] = {}

    if "latency" in res:
        rows = {}
        # The best peer by floor-normalised latency, the figure the ratios compare.
        scored = [
            (v, s)
            for s, reps in res["latency"].items()
            if is_peer(s) and (v := _med([_norm_latency(r) for r in reps.values()])) is not None
        ]
        best = min(scored)[1] if scored else None
        for s, reps in res["latency"].items():
            rows[s] = {
                "median_us": _metric(res, "latency", s, "median_us"),
                "p99_us": _metric(res, "latency", s, "p99_us"),
                "floor_median_us": _metric(res, "latency", s, "floor_median_us"),
                "x_floor": _med([_norm_latency(r) for r in reps.values()]),
                "x_anyio_process": _ratio(res, "latency", s, "anyio-to_process", _norm_latency),
                "x_anyio_interpreter": _ratio(
                    res, "latency", s, "anyio-to_interpreter", _norm_latency
                ),
                "x_best_peer": _ratio(res, "latency", s, best, _norm_latency) if best else None,
                "x_python_floor": _ratio(res, "latency", s, python_floor_of(s), _norm_latency),
                "x_previous": _ratio(res, "latency", s, prev, _norm_latency)
                if (prev := previous_of(s))
                else None,
                "n": _metric(res, "latency", s, "n"),
                "reps": len(reps),
            }
        summary["latency"] = {"best_peer": best, "rows": rows}

    if "throughput" in res:
        best = _best_peer(res, "throughput", "tasks_per_s", higher=True, python_only=True)
        rows = {}
        for s, reps in res["throughput"].items():
            rows[s] = {
                "tasks_per_s": _metric(res, "throughput", s, "tasks_per_s"),
                "tasks": _metric(res, "throughput", s, "tasks"),
                "budget_hit": any(r.get("budget_hit") for r in reps.values()),
                "x_floor": _ratio(res, "throughput", s, "floor", _key("tasks_per_s")),
                "x_best_peer": _ratio(res, "throughput", s, best, _key("tasks_per_s"))
                if best
                else None,
                "x_offload_process": _ratio(
                    res, "throughput", s, "offload-process", _key("tasks_per_s")
                ),
                "x_piscina": _ratio(res, "throughput", s, "piscina", _key("tasks_per_s")),
                "x_previous": _ratio(res, "throughput", s, prev, _key("tasks_per_s"))
                if (prev := previous_of(s))
                else None,
                "reps": len(reps),
            }
        summary["throughput"] = {"best_peer": best, "rows": rows}

    if "cpu" in res:
        rows = {}
        foreign = {
            (e["system"], e["rep"]): e.get("foreign_cpu")
            for e in raw
            if e["scenario"] == "cpu" and "result" in e
        }
        for s, reps in res["cpu"].items():
            left = [
                r["utilisation"] / (1.0 - f)
                for rep, r in reps.items()
                if (f := foreign.get((s, rep))) is not None and f < 0.9
            ]
            rows[s] = {
                "wall_s": _metric(res, "cpu", s, "wall_s"),
                "utilisation": _metric(res, "cpu", s, "utilisation"),
                "of_cpu_left": _med(left),
                "task_cpu_ms": _metric(res, "cpu", s, "task_cpu_ms_median"),
                "reps": len(reps),
            }
        summary["cpu"] = {"rows": rows}

    if "looplag" in res:
        rows = {}
        for s, reps in res["looplag"].items():
            rows[s] = {
                "p50_ms": _metric(res, "looplag", s, "p50_ms"),
                "p99_ms": _metric(res, "looplag", s, "p99_ms"),
                "max_ms": _metric(res, "looplag", s, "max_ms"),
                "ticks": _metric(res, "looplag", s, "ticks"),
                "reps": len(reps),
            }
        summary["looplag"] = {"rows": rows}

    if "payload" in res:
        best = _best_peer(res, "payload", "bytes.mib_per_s", higher=True)
        rows = {}
        for s, reps in res["payload"].items():
            row: dict[str, Any] = {"reps": len(reps)}
            for kind in ("bytes", "bytearray", "memoryview"):
                row[kind] = _metric(res, "payload", s, f"{kind}.mib_per_s")
                if row[kind] is None:
                    row[kind + "_error"] = _majority(
                        [_get(r, f"{kind}.error") for r in reps.values()]
                    )
            row["x_floor"] = _ratio(res, "payload", s, "floor", _key("bytes.mib_per_s"))
            row["x_best_peer"] = (
                _ratio(res, "payload", s, best, _key("bytes.mib_per_s")) if best else None
            )
            prev = previous_of(s)
            row["x_previous"] = (
                _ratio(res, "payload", s, prev, _key("bytes.mib_per_s")) if prev else None
            )
            rows[s] = row
        summary["payload"] = {"best_peer": best, "rows": rows}

    if "timeout" in res:
        rows = {}
        for s, reps in res["timeout"].items():
            stopped = [r["work_stopped"] for r in reps.values()]
            rows[s] = {
                "overshoot_ms": _metric(res, "timeout", s, "overshoot_ms"),
                "next_call_ms": _metric(res, "timeout", s, "next_call_ms"),
                "after_ms": _metric(res, "timeout", s, "after_ms_median"),
                "work_stopped": f"{'yes' if all(stopped) else 'no'}"
                + ("" if len(set(stopped)) == 1 else f" ({sum(stopped)}/{len(stopped)})"),
                "outcome": _majority([r["outcome"] for r in reps.values()]),
                "next_error": _majority([r.get("next_error") for r in reps.values()]),
                "x_previous_next": _ratio(res, "timeout", s, prev, _key("next_call_ms"))
                if (prev := previous_of(s))
                else None,
                "reps": len(reps),
            }
        summary["timeout"] = {"rows": rows}

    if "startup" in res:
        best = _best_peer(res, "startup", "ready_ms", higher=False)
        rows = {}
        for s, reps in res["startup"].items():
            rows[s] = {
                "ready_ms": _metric(res, "startup", s, "ready_ms"),
                "first_call_ms": _metric(res, "startup", s, "first_call_ms"),
                "start_ms": _metric(res, "startup", s, "start_ms"),
                "pair_workers": _majority([r.get("pair_workers") for r in reps.values()]),
                "shutdown_ms": _metric(res, "startup", s, "shutdown_ms"),
                "x_best_peer": _ratio(res, "startup", s, best, _key("ready_ms")) if best else None,
                "reps": len(reps),
            }
        summary["startup"] = {"best_peer": best, "rows": rows}

    if "map" in res:
        ppe = "ProcessPoolExecutor"
        rows = {}
        for s, reps in res["map"].items():
            sizes = sorted(
                {c for r in reps.values() for c in r.get("by_chunksize", {})},
                key=lambda c: (c.isdigit(), int(c) if c.isdigit() else 0),
            )
            rows[s] = {
                "items_per_s": _metric(res, "map", s, "items_per_s"),
                "best_chunksize": _majority([r.get("best_chunksize") for r in reps.values()]),
                "by_chunksize": {
                    c: _metric(res, "map", s, f"by_chunksize.{c}.items_per_s") for c in sizes
                },
                "x_ppe_best": _ratio(res, "map", s, ppe, _key("items_per_s")),
                "items": _metric(res, "map", s, "items"),
                "reps": len(reps),
            }
        summary["map"] = {"rows": rows}

    if "stream" in res:
        rows = {}
        for s, reps in res["stream"].items():
            rows[s] = {
                "stream_items_per_s": _metric(res, "stream", s, "stream_items_per_s"),
                "run_items_per_s": _metric(res, "stream", s, "run_items_per_s"),
                "stream_us_per_item": _metric(res, "stream", s, "stream_us_per_item"),
                "run_us_per_item": _metric(res, "stream", s, "run_us_per_item"),
                "x_run": _metric(res, "stream", s, "x_run"),
                "reps": len(reps),
            }
        summary["stream"] = {"rows": rows}

    if "payloadlag" in res:
        rows = {}
        for s, reps in res["payloadlag"].items():
            rows[s] = {
                "p50_ms": _metric(res, "payloadlag", s, "p50_ms"),
                "p99_ms": _metric(res, "payloadlag", s, "p99_ms"),
                "max_ms": _metric(res, "payloadlag", s, "max_ms"),
                "p99w_ms": _med([weighted_pct(r.get("lag_ms", []), 99) for r in reps.values()]),
                "stalled": _med(
                    [
                        sum(x for x in r.get("lag_ms", []) if x > 1.0)
                        / (sum(r.get("lag_ms", [])) + len(r.get("lag_ms", [])))
                        for r in reps.values()
                        if r.get("lag_ms")
                    ]
                ),
                "trips": _metric(res, "payloadlag", s, "trips"),
                "trip_ms": _metric(res, "payloadlag", s, "trip_ms_median"),
                "mib": _metric(res, "payloadlag", s, "mib"),
                "reps": len(reps),
            }
        summary["payloadlag"] = {"rows": rows}

    if imports:
        by_mod: dict[str, list[dict[str, Any]]] = defaultdict(list)
        errors: dict[str, str] = {}
        for entry in imports:
            if entry.get("cumulative_ms") is not None:
                by_mod[entry["module"]].append(entry)
            elif entry.get("error"):
                errors[entry["module"]] = entry["error"]
        rows = {
            m: {
                "cumulative_ms": _med([e["cumulative_ms"] for e in v]),
                "min_ms": min(e["cumulative_ms"] for e in v),
                "after_asyncio_ms": _med([e.get("after_asyncio_ms") for e in v]),
                "runs": len(v),
            }
            for m, v in by_mod.items()
        }
        for m, err in errors.items():
            rows.setdefault(m, {"cumulative_ms": None, "runs": 0, "error": err})
        summary["import"] = {"rows": rows}

    if "overload" in res:
        keys = (
            "capacity_per_s",
            "offered_per_s",
            "goodput_per_s",
            "goodput_fraction",
            "met_share",
            "refusal_p99_ms",
            "cheap_p99_ms",
            "cheap_base_p99_ms",
            "cheap_x_base",
            "hash_s",
            "workers",
            "expensive_sent",
            "accepted",
            "refused",
            "in_time",
            "late",
            "dropped_504",
            "unanswered",
            "cheap_failed",
            "cheap_sent",
            "loop_lag_p99_ms",
        )
        rows = {}
        for s, reps in res["overload"].items():
            row: dict[str, Any] = {key: _metric(res, "overload", s, key) for key in keys}
            row["inline"] = _med([_get(r, "manager.inline") for r in reps.values()])
            row["reps"] = len(reps)
            # Every repetition's headline figures, so a reader sees the spread, not a median.
            row["runs"] = [
                {
                    key: reps[rep].get(key)
                    for key in ("goodput_fraction", "met_share", "refusal_p99_ms", "cheap_x_base")
                }
                for rep in sorted(reps)
            ]
            rows[s] = row
        summary["overload"] = {"rows": rows}

    busy: Counter[tuple[str, str]] = Counter(
        (e["scenario"], e["system"])
        for e in raw
        if "result" in e and (e.get("foreign_cpu") or 0) > contended
    )
    for scenario, block in summary.items():
        for name, row in block.get("rows", {}).items():
            row["contended_reps"] = busy[(scenario, name)]

    summary["targets"] = evaluate_targets(summary)
    return summary


# --------------------------------------------------------------------------- targets


@dataclass(frozen=True)
class Target:
    scenario: str
    system: str
    label: str
    key: str
    op: str  # "<=", ">=" or ">"
    limit: float


#: Issue 12 section 5: the current release against the previous one, on asyncio, within 10 %.
PREVIOUS_TARGETS = tuple(
    target
    for system in ("offload-process", "offload-interpreter")
    for target in (
        Target("latency", system, "<= 1.1x previous release", "x_previous", "<=", 1.1),
        Target("throughput", system, ">= 0.9x previous release", "x_previous", ">=", 0.9),
        Target("payload", system, ">= 0.9x previous release", "x_previous", ">=", 0.9),
        Target("timeout", system, "next call <= 1.1x previous", "x_previous_next", "<=", 1.1),
    )
)

TARGETS = (
    # Issue 14.
    Target("latency", "offload-process", "<= 1.5x python floor", "x_python_floor", "<=", 1.5),
    Target("latency", "offload-interpreter", "<= 1.5x python floor", "x_python_floor", "<=", 1.5),
    Target("throughput", "offload-process", ">= 3x best Python peer", "x_best_peer", ">=", 3.0),
    Target("throughput", "offload-process", "> piscina", "x_piscina", ">", 1.0),
    Target("throughput", "offload-interpreter", ">= 3x best Python peer", "x_best_peer", ">=", 3.0),
    Target("throughput", "offload-interpreter", "> piscina", "x_piscina", ">", 1.0),
    Target(
        "throughput", "offload-interpreter", ">= offload-process", "x_offload_process", ">=", 1.0
    ),
    Target("map", "offload-process", ">= 2x PPE.map at its best", "x_ppe_best", ">=", 2.0),
    Target("map", "offload-interpreter", ">= 2x PPE.map at its best", "x_ppe_best", ">=", 2.0),
    Target("payloadlag", "offload-process", "p99 <= 1 ms", "p99_ms", "<=", 1.0),
    Target("payloadlag", "offload-interpreter", "p99 <= 1 ms", "p99_ms", "<=", 1.0),
    Target("cpu", "offload-process", "utilisation >= 0.95", "utilisation", ">=", 0.95),
    Target("cpu", "offload-interpreter", "utilisation >= 0.95", "utilisation", ">=", 0.95),
    Target("looplag", "offload-process", "p99 <= 1 ms", "p99_ms", "<=", 1.0),
    Target("looplag", "offload-interpreter", "p99 <= 1 ms", "p99_ms", "<=", 1.0),
    Target("payload", "offload-process", "bytes >= 2 GiB/s", "bytes", ">=", 2048.0),
    Target("payload", "offload-interpreter", "bytes >= 2 GiB/s", "bytes", ">=", 2048.0),
    Target("timeout", "offload-process", "back <= deadline+10 ms", "overshoot_ms", "<=", 10.0),
    Target("timeout", "offload-process", "next call <= 5 ms", "next_call_ms", "<=", 5.0),
    Target("timeout", "offload-interpreter", "back <= deadline+10 ms", "overshoot_ms", "<=", 10.0),
    Target("timeout", "offload-interpreter", "next call <= 5 ms", "next_call_ms", "<=", 5.0),
    Target("startup", "offload-process", "ready <= 150 ms", "ready_ms", "<=", 150.0),
    Target("startup", "offload-interpreter", "ready <= 150 ms", "ready_ms", "<=", 150.0),
    Target("import", "offload", "import <= 30 ms", "cumulative_ms", "<=", 30.0),
    *(
        target
        for system in ("offload-admission", "offload-admission-jwt-on-loop")
        for target in (
            Target("overload", system, "goodput >= 0.9x capacity", "goodput_fraction", ">=", 0.9),
            Target("overload", system, ">= 99% of accepted in time", "met_share", ">=", 0.99),
            Target("overload", system, "refusal p99 <= 50 ms", "refusal_p99_ms", "<=", 50.0),
            Target("overload", system, "cheap p99 <= 3x unloaded", "cheap_x_base", "<=", 3.0),
        )
    ),
    *PREVIOUS_TARGETS,
)


def evaluate_targets(summary: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for t in TARGETS:
        row = summary.get(t.scenario, {}).get("rows", {}).get(t.system)
        if row is None:
            continue
        value = row.get(t.key)
        if value is None and t.key.startswith("x_"):
            continue  # the system compared with did not run (skipped: see the notes)
        if value is None:
            status = "n/a"
        elif t.op == "<=":
            status = "met" if value <= t.limit else "MISSED"
        elif t.op == ">":
            status = "met" if value > t.limit else "MISSED"
        else:
            status = "met" if value >= t.limit else "MISSED"
        out.append(
            {
                "scenario": t.scenario,
                "system": t.system,
                "target": t.label,
                "key": t.key,
                "value": value,
                "status": status,
            }
        )
    return out


# --------------------------------------------------------------------------- tables


def fmt(v: Any, digits: int = 1) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.{digits}f}"
    return str(v)


def fx(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]
    lines = []
    for k, cells in enumerate([headers, *rows]):
        parts = []
        for i, c in enumerate(cells):
            parts.append(
                c.ljust(widths[i]) if i == 0 or i == len(cells) - 1 else c.rjust(widths[i])
            )
        lines.append("  ".join(parts).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _targets_cell(summary: dict[str, Any], scenario: str, system: str) -> str:
    cells = [
        f"{t['target']}: {t['status']}"
        for t in summary.get("targets", [])
        if t["scenario"] == scenario and t["system"] == system
    ]
    return "; ".join(cells)


def _label(rows: dict[str, Any], name: str) -> str:
    """The row's name, with ``!`` if a repetition ran while other processes were busy."""
    return name + ("!" if rows[name].get("contended_reps") else "")


def _order(rows: dict[str, Any]) -> list[str]:
    def rank(s: str) -> tuple[int, str]:
        b = base(s)
        group = 0 if b in FLOORS else 1 if b in OFFLOAD else 2 if b in PREVIOUS_OFFLOAD else 3
        return (group, s)

    return sorted(rows, key=rank)


TITLES = {
    "latency": "latency: echo(i) round trip, one at a time (us). xfloor = / in-runner floor;"
    " other x columns compare floor-normalised latency",
    "throughput": "throughput: trivial echo tasks, {inflight} in flight (tasks/s)",
    "cpu": "cpu: {cpu_tasks} x ~{cpu_task_ms:g} ms pure-Python tasks on 2 workers",
    "looplag": "looplag: 1 ms ticker lag while both workers run CPU tasks (ms);"
    " floor row = idle loop",
    "payload": "payload: {payload_mib} MiB echo round trip (MiB/s = size / round-trip time)",
    "timeout": "timeout: {timeout_sleep:g} s sleep task, {deadline_ms:g} ms deadline",
    "startup": "startup: construct/start -> first call -> both workers answered (ms)",
    "import": "import: python -X importtime -c 'import MODULE', cumulative (ms)",
    "overload": "overload: a uvicorn server, expensive work (scrypt ~{overload_hash_s:g} s,"
    " {overload_deadline:g} s deadline) at {overload_factor:g}x its capacity, plus"
    " {overload_cheap_rate:g} cheap JWT checks/s",
    "map": "map: {map_items:,} trivial items through the system's own map (items/s)",
    "stream": "stream: one wm.stream of {stream_items:,} trivial items against one awaited run"
    " per item",
    "payloadlag": "payloadlag: 1 ms ticker lag while {payloadlag_mib} MiB arguments flow to both"
    " workers (ms)",
    "previous": "previous release: the current offload / the previous release's (issue 12"
    " section 5, asyncio; within 10 %)",
}


def render(summary: dict[str, Any], params: dict[str, Any]) -> str:
    fmt_params = {**params, "inflight": params.get("throughput_inflight")}
    fmt_params["deadline_ms"] = params.get("timeout_deadline", 0.1) * 1000
    out: list[str] = []

    def section(name: str, headers: list[str], rows: list[list[str]], extra: str = "") -> None:
        out.append("")
        out.append("== " + TITLES[name].format(**fmt_params))
        if extra:
            out.append(extra)
        out.append(_table(headers, rows))

    if "latency" in summary:
        s = summary["latency"]
        rows = []
        for name in _order(s["rows"]):
            r = s["rows"][name]
            rows.append(
                [
                    _label(s["rows"], name),
                    fmt(r["median_us"]),
                    fmt(r["p99_us"]),
                    fmt(r["floor_median_us"]),
                    fx(r["x_floor"]),
                    fx(r["x_anyio_process"]),
                    fx(r["x_anyio_interpreter"]),
                    fx(r["x_best_peer"]),
                    fx(r.get("x_python_floor")),
                    fx(r.get("x_previous")),
                    fmt(r["n"], 0),
                    _targets_cell(summary, "latency", name),
                ]
            )
        headers = [
            "system", "median", "p99", "floor", "xfloor", "xanyio-proc", "xanyio-interp",
            "xbest-peer", "xpy-floor", "xprevious", "n", "targets",
        ]  # fmt: skip
        section("latency", headers, rows, f"best peer: {s['best_peer']}")

    if "throughput" in summary:
        s = summary["throughput"]
        rows = []
        for name in _order(s["rows"]):
            r = s["rows"][name]
            rows.append(
                [
                    _label(s["rows"], name),
                    fmt(r["tasks_per_s"]),
                    fmt(r["tasks"], 0) + ("*" if r["budget_hit"] else ""),
                    fx(r["x_floor"]),
                    fx(r["x_best_peer"]),
                    fx(r.get("x_piscina")),
                    fx(r.get("x_previous")),
                    _targets_cell(summary, "throughput", name),
                ]
            )
        section(
            "throughput",
            [
                "system",
                "tasks/s",
                "tasks",
                "xfloor",
                "xbest-Python-peer",
                "xpiscina",
                "xprevious",
                "targets",
            ],
            rows,
            f"best Python peer: {s['best_peer']}; * = stopped by the time budget"
            f" ({params.get('throughput_budget')} s) before all tasks ran",
        )

    if "cpu" in summary:
        s = summary["cpu"]
        rows = [
            [
                _label(s["rows"], name),
                fmt(r["wall_s"], 3),
                fmt(r["utilisation"], 2),
                fmt(r.get("of_cpu_left"), 2),
                fmt(r["task_cpu_ms"]),
                _targets_cell(summary, "cpu", name),
            ]
            for name in _order(s["rows"])
            for r in [s["rows"][name]]
        ]
        section(
            "cpu",
            ["system", "wall s", "utilisation", "of CPU left", "cpu/task ms", "targets"],
            rows,
            "utilisation = sum of in-task CPU time / (wall x 2 workers); of CPU left = the same"
            " / the share of the CPUs other processes left free during the measurement",
        )

    if "looplag" in summary:
        s = summary["looplag"]
        rows = [
            [
                _label(s["rows"], name),
                fmt(r["p50_ms"], 3),
                fmt(r["p99_ms"], 3),
                fmt(r["max_ms"], 2),
                fmt(r["ticks"], 0),
                _targets_cell(summary, "looplag", name),
            ]
            for name in _order(s["rows"])
            for r in [s["rows"][name]]
        ]
        section("looplag", ["system", "p50", "p99", "max", "ticks", "targets"], rows)

    if "payload" in summary:
        s = summary["payload"]
        rows = []
        for name in _order(s["rows"]):
            r = s["rows"][name]
            cells = [_label(s["rows"], name)]
            for kind in ("bytes", "bytearray", "memoryview"):
                v = r.get(kind)
                cells.append(fmt(v, 0) if v is not None else _short_error(r.get(kind + "_error")))
            cells += [
                fx(r["x_floor"]),
                fx(r["x_best_peer"]),
                fx(r.get("x_previous")),
                _targets_cell(summary, "payload", name),
            ]
            rows.append(cells)
        section(
            "payload",
            [
                "system",
                "bytes",
                "bytearray",
                "memoryview",
                "xfloor",
                "xbest-peer",
                "xprevious",
                "targets",
            ],
            rows,
            f"best peer: {s['best_peer']}",
        )

    if "timeout" in summary:
        s = summary["timeout"]
        rows = [
            [
                _label(s["rows"], name),
                fmt(r["overshoot_ms"]),
                r["work_stopped"],
                fmt(r["next_call_ms"], 2),
                fmt(r["after_ms"], 2),
                fx(r.get("x_previous_next")),
                str(r["outcome"]),
                _targets_cell(summary, "timeout", name),
            ]
            for name in _order(s["rows"])
            for r in [s["rows"][name]]
        ]
        section(
            "timeout",
            [
                "system",
                "back-deadline",
                "stopped",
                "next call",
                "then",
                "next xprevious",
                "raised",
                "targets",
            ],
            rows,
            "back-deadline = time until control returned minus the deadline (ms); stopped ="
            " heartbeat stopped within 0.5 s and never completed; then = median of 5 more calls",
        )

    if "startup" in summary:
        s = summary["startup"]
        rows = [
            [
                _label(s["rows"], name),
                fmt(r["start_ms"]),
                fmt(r["first_call_ms"]),
                fmt(r["ready_ms"]),
                fmt(r["pair_workers"]),
                fmt(r["shutdown_ms"]),
                fx(r["x_best_peer"]),
                _targets_cell(summary, "startup", name),
            ]
            for name in _order(s["rows"])
            for r in [s["rows"][name]]
        ]
        section(
            "startup",
            [
                "system",
                "start",
                "first call",
                "ready",
                "workers",
                "shutdown",
                "xbest-peer",
                "targets",
            ],
            rows,
            "ready = start + first call + two concurrent calls; workers = distinct workers"
            " that answered the pair",
        )

    if "overload" in summary:
        s = summary["overload"]
        rows = []
        for name in _order(s["rows"]):
            r = s["rows"][name]
            rows.append(
                [
                    _label(s["rows"], name),
                    f"{fmt(r['capacity_per_s'], 2)} ({fmt(r['workers'], 0)}w)",
                    fmt(r["offered_per_s"], 2),
                    fmt(r["goodput_per_s"], 2),
                    _share(r["goodput_fraction"]),
                    _share(r["met_share"]),
                    fmt(r["refusal_p99_ms"]),
                    f"{fmt(r['cheap_p99_ms'])} / {fmt(r['cheap_base_p99_ms'])}",
                    fx(r["cheap_x_base"]),
                    f"{fmt(r['refused'], 0)}/{fmt(r['late'], 0)}/{fmt(r['dropped_504'], 0)}",
                    _targets_cell(summary, "overload", name),
                ]
            )
        section(
            "overload",
            [
                "system",
                "capacity/s",
                "offered/s",
                "goodput/s",
                "xcapacity",
                "in time",
                "503 p99 ms",
                "cheap p99 ms (unloaded)",
                "xunloaded",
                "503/late/504",
                "targets",
            ],
            rows,
            "goodput = expensive answered within the deadline per second; in time = share of"
            " accepted (not refused) that met it; 503/late/504 = refused at once / answered"
            " after the deadline / dropped unstarted (medians over repetitions)",
        )
        for name in _order(s["rows"]):
            runs = s["rows"][name]["runs"]
            out.append(
                f"  {name} per repetition: "
                + "; ".join(
                    f"xcap {_share(run['goodput_fraction'])}, in time {_share(run['met_share'])},"
                    f" 503 p99 {fmt(run['refusal_p99_ms'])} ms, cheap {fx(run['cheap_x_base'])}"
                    for run in runs
                )
            )

    if "import" in summary:
        s = summary["import"]
        rows = [
            [
                mod,
                fmt(r["cumulative_ms"]),
                fmt(r.get("min_ms")),
                fmt(r.get("after_asyncio_ms")),
                fmt(r["runs"], 0),
                _targets_cell(summary, "import", mod) or r.get("error", ""),
            ]
            for mod, r in sorted(s["rows"].items(), key=lambda kv: (kv[0] != "offload", kv[0]))
        ]
        section(
            "import",
            ["module", "median", "min", "after asyncio", "runs", "targets"],
            rows,
            "warm bytecode cache; after asyncio = the same import when asyncio is already"
            " loaded (its cost inside an asyncio app)",
        )

    if "map" in summary:
        s = summary["map"]
        rows = [
            [
                _label(s["rows"], name),
                fmt(r["items_per_s"]),
                str(r["best_chunksize"]),
                ", ".join(f"{c}: {fmt(v)}" for c, v in r["by_chunksize"].items()),
                fx(r["x_ppe_best"]),
                _targets_cell(summary, "map", name),
            ]
            for name in _order(s["rows"])
            for r in [s["rows"][name]]
        ]
        section(
            "map",
            ["system", "items/s", "best chunksize", "items/s by chunksize", "xPPE-best", "targets"],
            rows,
            "offload: its adaptive default; ProcessPoolExecutor: its own map at each chunksize;"
            " xPPE-best = / ProcessPoolExecutor's best chunksize in the same repetition",
        )

    if "stream" in summary:
        s = summary["stream"]
        rows = [
            [
                _label(s["rows"], name),
                fmt(r["stream_items_per_s"]),
                fmt(r["stream_us_per_item"], 2),
                fmt(r["run_items_per_s"]),
                fmt(r["run_us_per_item"], 1),
                fx(r["x_run"]),
            ]
            for name in _order(s["rows"])
            for r in [s["rows"][name]]
        ]
        section(
            "stream",
            ["system", "stream items/s", "us/item", "run items/s", "us/run", "xrun"],
            rows,
            "async with wm.stream(count_up, n) as items: async for item in items  vs  await"
            " wm.run(echo, i) one at a time",
        )

    if "payloadlag" in summary:
        s = summary["payloadlag"]
        rows = [
            [
                _label(s["rows"], name),
                fmt(r["p50_ms"], 3),
                fmt(r["p99_ms"], 3),
                fmt(r["max_ms"], 2),
                fmt(r.get("p99w_ms"), 2),
                "-" if r.get("stalled") is None else f"{r['stalled']:.0%}",
                fmt(r["trips"], 0),
                fmt(r["trip_ms"], 1),
                _targets_cell(summary, "payloadlag", name),
            ]
            for name in _order(s["rows"])
            for r in [s["rows"][name]]
        ]
        section(
            "payloadlag",
            [
                "system",
                "p50",
                "p99",
                "max",
                "p99 by time",
                "stalled",
                "trips",
                "ms/trip",
                "targets",
            ],
            rows,
            f"two calls in flight at a time, each nbytes({params.get('payloadlag_mib')} MiB"
            " bytes); the byte floor echoes the buffer instead. p50/p99/max: of the ticks;"
            " p99 by time: each tick weighted by its length (a long stall counts for all of"
            " its time); stalled: share of the time lost to ticks over 1 ms late",
        )

    prev_rows = [
        [
            name,
            fx(summary.get("latency", {}).get("rows", {}).get(name, {}).get("x_previous")),
            fx(summary.get("throughput", {}).get("rows", {}).get(name, {}).get("x_previous")),
            fx(summary.get("payload", {}).get("rows", {}).get(name, {}).get("x_previous")),
            fx(summary.get("timeout", {}).get("rows", {}).get(name, {}).get("x_previous_next")),
        ]
        for name in sorted(
            {
                n
                for sc in ("latency", "throughput", "payload", "timeout")
                for n in summary.get(sc, {}).get("rows", {})
                if previous_of(base(n))
            }
        )
    ]
    prev_rows = [r for r in prev_rows if any(c != "-" for c in r[1:])]
    if prev_rows:
        section(
            "previous",
            ["system", "round trip", "throughput", "8 MiB bytes", "timeout -> next call"],
            prev_rows,
            "each cell = current / previous in the same repetition (round trip: floor-"
            "normalised); within 10 %: <= 1.10x for times, >= 0.90x for rates",
        )

    targets = summary.get("targets", [])
    if targets:
        out.append("")
        out.append("== targets")
        rows = [
            [t["system"], t["scenario"], t["target"], _fmt_target_value(t), t["status"]]
            for t in targets
        ]
        out.append(_table(["system", "scenario", "target", "value", "status"], rows))
        met = sum(t["status"] == "met" for t in targets)
        out.append(f"{met}/{len(targets)} targets met")
    return "\n".join(out)


def _share(v: float | None) -> str:
    return "-" if v is None else f"{v:.0%}"


def _fmt_target_value(t: dict[str, Any]) -> str:
    v = t["value"]
    if v is None:
        return "-"
    if t["key"].startswith("x_"):
        return f"{v:.2f}x"
    return fmt(v, 2)


def _short_error(err: str | None) -> str:
    if not err:
        return "-"
    return "n/a (" + err.split(":")[0] + ")"


def brief(scenario: str, result: dict[str, Any]) -> str:
    """One-line progress summary of a single measurement."""
    try:
        if scenario == "latency":
            return (
                f"median {result['median_us']:.0f} us (floor {result['floor_median_us']:.0f}),"
                f" n={result['n']}"
            )
        if scenario == "throughput":
            return f"{result['tasks_per_s']:,.0f} tasks/s ({result['tasks']} tasks)"
        if scenario == "cpu":
            return f"wall {result['wall_s']:.3f} s, utilisation {result['utilisation']:.2f}"
        if scenario == "looplag":
            return f"lag p50 {result['p50_ms']:.3f} ms, p99 {result['p99_ms']:.3f} ms"
        if scenario == "payload":
            parts = []
            for kind in ("bytes", "bytearray", "memoryview"):
                v = result.get(kind, {})
                parts.append(f"{kind} {v['mib_per_s']:.0f}" if "mib_per_s" in v else f"{kind} n/a")
            return "MiB/s: " + ", ".join(parts)
        if scenario == "timeout":
            return (
                f"back +{result['overshoot_ms']:.1f} ms, stopped={result['work_stopped']},"
                f" next {result['next_call_ms']:.2f} ms"
            )
        if scenario == "startup":
            return f"ready {result['ready_ms']:.1f} ms (first call {result['first_call_ms']:.1f})"
        if scenario == "overload":
            refusal = result["refusal_p99_ms"]
            return (
                f"capacity {result['capacity_per_s']:.2f}/s, goodput"
                f" {result['goodput_fraction']:.0%} of it, {result['in_time']}/"
                f"{result['accepted']} accepted in time, {result['refused']} refused"
                f" (p99 {'-' if refusal is None else f'{refusal:.1f}'} ms), cheap p99"
                f" {result['cheap_p99_ms']:.1f} ms vs {result['cheap_base_p99_ms']:.1f} unloaded,"
                f" {result['manager']['inline']} inline"
            )
        if scenario == "map":
            return (
                f"{result['items_per_s']:,.0f} items/s (chunksize {result['best_chunksize']};"
                + ", ".join(
                    f" {c}: {v['items_per_s']:,.0f}" for c, v in result["by_chunksize"].items()
                )
                + ")"
            )
        if scenario == "stream":
            return (
                f"stream {result['stream_items_per_s']:,.0f} items/s, run"
                f" {result['run_items_per_s']:,.0f}/s ({result['x_run']:.1f}x)"
            )
        if scenario == "payloadlag":
            return (
                f"lag p50 {result['p50_ms']:.3f} ms, p99 {result['p99_ms']:.3f} ms,"
                f" {result['trips']} trips"
            )
    except (KeyError, TypeError):
        pass
    return "done"


# --------------------------------------------------------------------------- chart

CHART_METRICS = (
    ("latency", "median_us", "latency median (us)"),
    ("throughput", "tasks_per_s", "throughput (tasks/s)"),
    ("cpu", "utilisation", "cpu utilisation"),
    ("looplag", "p99_ms", "loop lag p99 (ms)"),
    ("payload", "bytes", "payload bytes (MiB/s)"),
    ("timeout", "overshoot_ms", "timeout: back - deadline (ms)"),
    ("startup", "ready_ms", "startup ready (ms)"),
    ("import", "cumulative_ms", "import (ms)"),
    ("overload", "goodput_fraction", "overload: goodput / capacity"),
    ("map", "items_per_s", "map of trivial items (items/s)"),
    ("stream", "stream_items_per_s", "wm.stream vs one run per item (items/s)"),
    ("payloadlag", "p99_ms", "loop lag p99, 100 MiB args in flight (ms)"),
)


def _colour(name: str) -> str:
    b = base(name)
    if b in OFFLOAD or b == "offload":
        return "tab:orange"
    if b in PREVIOUS_OFFLOAD:
        return "navajowhite"
    if b in FLOORS or b == "asyncio":
        return "tab:gray"
    if b in NOT_PYTHON:
        return "tab:green"
    return "tab:blue"


def chart(summary: dict[str, Any], path: str, title: str) -> None:
    """Bar charts of each scenario's headline figure; PNG or SVG by extension."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [  # (a scenario none of the systems shown took part in gets no empty panel)
        m
        for m in CHART_METRICS
        if m[0] in summary
        and any(row.get(m[1]) is not None for row in summary[m[0]]["rows"].values())
    ]
    if not panels:
        raise ValueError("nothing to chart")
    cols = 2 if len(panels) > 1 else 1
    nrows = (len(panels) + cols - 1) // cols
    most = max(len(summary[m[0]]["rows"]) for m in panels)
    fig, axes = plt.subplots(
        nrows, cols, figsize=(6.5 * cols, max(3.2, 0.22 * most + 1.0) * nrows), squeeze=False
    )
    limits = {(t.scenario, t.key): t.limit for t in TARGETS if not t.key.startswith("x_")}
    for ax, (scenario, key, label) in zip(axes.flat, panels, strict=False):
        rows = summary[scenario]["rows"]
        names = [n for n in _order(rows) if rows[n].get(key) is not None]
        values = [rows[n][key] for n in names]
        colors = [_colour(n) for n in names]
        if scenario == "stream":  # each system's stream beside its one-run-per-item figure
            pairs = [(n, rows[n].get("run_items_per_s")) for n in names]
            names = [label for n, _ in pairs for label in (f"{n}: stream", f"{n}: run per item")]
            values = [v for n, run in pairs for v in (rows[n][key], run or 0.0)]
            colors = [c for n, _ in pairs for c in (_colour(n), "tab:gray")]
        ax.barh(names, values, color=colors)
        positive = [v for v in values if v > 0]
        if positive and max(positive) / min(positive) > 50:
            ax.set_xscale("log")
        ax.invert_yaxis()
        ax.set_title(label, fontsize=10)
        ax.tick_params(labelsize=8)
        limit = limits.get((scenario, key))
        if limit is not None:
            ax.axvline(limit, color="tab:red", linestyle="--", linewidth=1, label="target")
            ax.legend(fontsize=7, loc="lower right")
        for i, v in enumerate(values):
            ax.text(v, i, f" {fmt(v, 2)}", va="center", fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.985))
    fig.savefig(path)
    plt.close(fig)


# --------------------------------------------------------------------------- merged runs


def merge_summaries(runs: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """One summary from several runs' (``python``, summary): each row renamed
    ``system@python``; its ratios stay those of its own run. Targets are renamed the same way."""
    merged: dict[str, Any] = {}
    targets: list[dict[str, Any]] = []
    for python, summary in runs:
        for scenario, block in summary.items():
            if scenario == "targets":
                continue
            into = merged.setdefault(scenario, {"rows": {}})
            for key, value in block.items():
                if key == "rows":
                    for name, row in value.items():
                        into["rows"][f"{name}@{python}"] = row
                elif value is not None:
                    into[key] = (
                        f"{into[key]}, {value}@{python}" if key in into else f"{value}@{python}"
                    )
        for t in summary.get("targets", []):
            targets.append({**t, "system": f"{t['system']}@{python}"})
    merged["targets"] = targets
    return merged
