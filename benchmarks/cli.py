"""The orchestrator: ``python -m benchmarks [--quick] [--scenarios a,b] [--systems x,y] ...``.

Each system lives in its own runner process (``benchmarks._runner``), started once and then
told to run one scenario at a time, so every library starts from a clean interpreter and a
hang or crash costs one measurement, not the run. Within a repetition, each scenario visits
every system once, in an order rotated per repetition and scenario. Every command has a
hard time limit; on expiry the runner and its whole process tree are killed (the
orchestrator is a child subreaper, so even orphaned workers come back to it).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import select
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

from . import _procs, report
from ._tasks import calibrate_burn
from .scenarios import ALL_SCENARIOS, Params, applies
from .systems import SYSTEMS, Unavailable

#: A measurement during which other processes used more than this share of the CPUs
#: is flagged as contended.
CONTENDED = 0.10
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class RunnerDied(Exception):
    pass


class Runner:
    """One system's runner process and the pipe its answers come back on."""

    def __init__(
        self,
        system: str,
        loop: str,
        logdir: str,
        warm: bool = True,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.system = system
        self.log_path = os.path.join(logdir, f"{system}.log")
        rfd, wfd = os.pipe()
        warm = "warm" if warm else "cold"
        env = dict(os.environ)
        extra = dict(extra_env or {})
        first = extra.pop("PYTHONPATH", None)  # prepended: it must win over the checkout
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (first, REPO_ROOT, env.get("PYTHONPATH")) if p
        )
        env.update(extra)
        # Warm bytecode for runners and their workers alike (see _import_once).
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = os.path.join(logdir, "pycache")
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "benchmarks._runner", system, str(wfd), loop, warm],
                stdin=subprocess.PIPE,
                stdout=logf,
                stderr=logf,
                pass_fds=(wfd,),
                cwd=REPO_ROOT,
                env=env,
                start_new_session=True,
            )
        os.close(wfd)
        self.rfd = rfd
        self.buf = b""

    def read(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no answer within {timeout:.0f} s")
            ready, _, _ = select.select([self.rfd], [], [], min(left, 1.0))
            if ready:
                chunk = os.read(self.rfd, 1 << 16)
                if not chunk:
                    raise RunnerDied(f"runner exited (code {self.proc.poll()}); {self.log_tail()}")
                self.buf += chunk
            elif self.proc.poll() is not None:
                raise RunnerDied(f"runner exited (code {self.proc.returncode}); {self.log_tail()}")
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def send(self, obj: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(obj) + "\n").encode())
        self.proc.stdin.flush()

    def log_tail(self, n: int = 600) -> str:
        try:
            with open(self.log_path, "rb") as f:
                data = f.read()[-n:]
        except OSError:
            return ""
        return "log: " + data.decode(errors="replace").strip().replace("\n", " | ")

    def kill(self) -> None:
        _procs.kill_tree(self.proc.pid)
        with contextlib.suppress(OSError):
            os.close(self.rfd)
        with contextlib.suppress(OSError):
            self.proc.stdin.close()  # type: ignore[union-attr]
        with contextlib.suppress(Exception):
            self.proc.wait(2)

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.send({"op": "quit"})
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        self.kill()


def command_timeout(scenario: str, p: Params, quick: bool) -> float:
    base = 30.0 if quick else 90.0
    extra = {
        "latency": p.latency_budget,
        "throughput": p.throughput_budget,
        "cpu": p.cpu_tasks * p.cpu_task_ms / 1000.0 * 4,
        "looplag": p.looplag_seconds,
        "payload": 3 * p.payload_budget,
        "timeout": p.timeout_sleep * 2,
        "overload": 60
        + p.overload_baseline_s
        + 3 * p.overload_capacity_s
        + p.overload_seconds
        + p.overload_deadline,
        "map": 60.0 if p.map_all_chunksizes else 10.0,
        "stream": p.stream_budget + 30.0,
        "payloadlag": p.payloadlag_seconds + 3 * p.payloadlag_call_timeout,
    }.get(scenario, 0.0)
    return base + extra


def parse_list(value: str | None, allowed: list[str], what: str) -> list[str]:
    if not value:
        return list(allowed)
    items = [x.strip() for x in value.split(",") if x.strip()]
    unknown = [x for x in items if x not in allowed]
    if unknown:
        raise SystemExit(f"unknown {what}: {', '.join(unknown)} (choose from {', '.join(allowed)})")
    return items


def parse_import_time(stderr: str, module: str) -> float | None:
    """Sum of the top-level ``-X importtime`` entries making up ``import module`` (ms)."""
    wanted = set()
    parts = module.split(".")
    for i in range(1, len(parts) + 1):
        wanted.add(".".join(parts[:i]))
    total = 0
    seen = False
    for line in stderr.splitlines():
        if not line.startswith("import time:"):
            continue
        fields = line.split("|")
        if len(fields) < 3 or not fields[1].strip().isdigit():
            continue
        name = fields[2]
        if name.startswith("  "):  # nested import: counted in its parent's cumulative
            continue
        if name.strip() in wanted:
            total += int(fields[1])
            seen = True
    return total / 1000.0 if seen else None


def _import_once(module: str, preload: str, pycache: str) -> tuple[float | None, str | None]:
    code = f"import {preload}; import {module}" if preload else f"import {module}"
    env = dict(os.environ)
    # Warm bytecode: this machine sets PYTHONDONTWRITEBYTECODE, which would make every
    # sample compile from source. Caches go to a private prefix, not into the source tree.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = pycache
    try:
        proc = subprocess.run(
            [sys.executable, "-X", "importtime", "-c", code],
            capture_output=True,
            text=True,
            cwd=pycache,
            env=env,
            timeout=60,
        )
    except subprocess.TimeoutExpired:
        return None, "timed out"
    if proc.returncode != 0:
        last = proc.stderr.strip().splitlines()[-1:] or ["?"]
        return None, last[0][:160]
    return parse_import_time(proc.stderr, module), None


def measure_import(module: str, pycache: str) -> dict[str, Any]:
    """``import module`` alone, and again after ``import asyncio`` (its cost in an app)."""
    alone, err = _import_once(module, "", pycache)
    if err:
        return {"module": module, "error": err}
    after, _ = _import_once(module, "asyncio", pycache) if module != "asyncio" else (None, None)
    return {"module": module, "cumulative_ms": alone, "after_asyncio_ms": after}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Benchmark offload against a pipe floor and its peers, interleaved.",
    )
    ap.add_argument("--quick", action="store_true", help="small counts, a few seconds per system")
    ap.add_argument("--scenarios", help=f"comma-separated subset of: {', '.join(ALL_SCENARIOS)}")
    ap.add_argument("--systems", help=f"comma-separated subset of: {', '.join(SYSTEMS)}")
    ap.add_argument("--repeat", type=int, help="repetitions (default 3, --quick 1)")
    ap.add_argument("--json", metavar="PATH", help="write raw samples and the summary as JSON")
    ap.add_argument(
        "--chart", metavar="PATH", help="write a chart (.png or .svg; needs matplotlib)"
    )
    ap.add_argument(
        "--loop", choices=("asyncio", "uvloop"), default="asyncio", help="event loop in runners"
    )
    ap.add_argument("--list", action="store_true", help="list systems and scenarios, then exit")
    ap.add_argument(
        "--merge",
        nargs="+",
        metavar="JSON",
        help="print the tables (and --chart) of runs saved with --json, side by side: rows are"
        " named system@python, and every ratio stays within its own run",
    )
    return ap


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.merge:
        return merge_runs(args.merge, args.chart, args.systems, args.scenarios)
    if args.list:
        for name, cls in SYSTEMS.items():
            print(f"{name:28} {cls.doc}")
        print("scenarios:", ", ".join(ALL_SCENARIOS))
        return 0
    scenarios = parse_list(args.scenarios, list(ALL_SCENARIOS), "scenario")
    systems = parse_list(args.systems, list(SYSTEMS), "system")
    params = Params.quick() if args.quick else Params()
    repeat = args.repeat if args.repeat else (1 if args.quick else 3)
    if repeat < 1:
        raise SystemExit("--repeat must be >= 1")
    if args.chart and not args.chart.lower().endswith((".png", ".svg")):
        raise SystemExit("--chart must end in .png or .svg")

    _procs.become_subreaper()
    # SIGTERM/SIGHUP stop the run like Ctrl-C does: through the cleanup below.
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _interrupt)
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:  # started in the background
        signal.signal(signal.SIGINT, _interrupt)
    t_start = time.perf_counter()
    if {"cpu", "looplag"} & set(scenarios):
        params.burn_per_ms = calibrate_burn()
    if "overload" in scenarios:
        from .overload import calibrate_scrypt

        # Once for the whole run, so every system and repetition hashes the same cost.
        params.overload_scrypt_p = calibrate_scrypt(params.overload_hash_s)["p"]
    busy_before = _procs.cpu_busy(0.5)
    log(
        f"python {platform.python_version()} ({sys.executable}), {os.cpu_count()} cpus,"
        f" loop={args.loop}, repeat={repeat}{' (quick)' if args.quick else ''}"
    )
    if busy_before is not None and busy_before > 0.15:
        log(
            f"WARNING: the machine was {busy_before:.0%} busy before the run started:"
            " other processes are competing for the CPUs; figures will be noisy"
        )

    logdir = tempfile.mkdtemp(prefix="offload-bench-")
    pycache = os.path.join(logdir, "pycache")
    os.makedirs(pycache)
    runners: dict[str, Runner] = {}
    skipped: dict[str, str] = {}
    versions: dict[str, str] = {}
    raw: list[dict[str, Any]] = []
    imports: list[dict[str, Any]] = []

    starting: dict[str, Runner] = {}
    prepared: dict[str, dict[str, str]] = {}

    def new_runner(name: str) -> Runner:
        extra = prepared.get(name)
        return Runner(name, args.loop, logdir, warm=not args.quick, extra_env=extra)

    def get_runner(name: str) -> Runner | None:
        if name in skipped:
            return None
        if name in runners:
            return runners[name]
        runner = starting.pop(name, None) or new_runner(name)
        try:
            hello = runner.read(120)
        except (TimeoutError, RunnerDied) as exc:
            runner.kill()
            skipped[name] = f"runner failed to start: {exc}"
            log(f"  skip {name}: {skipped[name]}")
            return None
        if "unavailable" in hello:
            runner.kill()
            skipped[name] = hello["unavailable"]
            log(f"  skip {name}: {skipped[name]}")
            return None
        versions[name] = hello.get("version", "")
        if hello.get("warmup_error"):
            log(f"  {name}: warm-up cycle failed: {hello['warmup_error']}")
        runners[name] = runner
        return runner

    interrupted = False
    try:
        # Start every runner at once, before anything is measured: their imports and
        # warm-up cycles overlap instead of adding up. Idle runners only wait on a pipe.
        needed = [
            s for s in systems if any(applies(SYSTEMS[s], sc) for sc in scenarios if sc != "import")
        ]
        # What some systems need from outside (a wheel of the previous release, piscina from
        # npm) is made before any runner starts, and cached (benchmarks/_external.py).
        for name in needed:
            cls = SYSTEMS[name]
            if cls.slow_to_prepare and args.quick and not args.systems:
                skipped[name] = (
                    "skipped with --quick unless named in --systems (needs a build or a"
                    " download first)"
                )
                log(f"  skip {name}: {skipped[name]}")
                continue
            try:
                prepared[name] = cls.prepare(args.quick)
            except Unavailable as exc:
                skipped[name] = str(exc)
                log(f"  skip {name}: {skipped[name]}")
        for name in needed:
            if name not in skipped:
                starting[name] = new_runner(name)
        for name in needed:
            get_runner(name)
        for rep in range(repeat):
            for si, scenario in enumerate(scenarios):
                if scenario == "import":
                    modules = sorted(
                        {
                            SYSTEMS[s].import_name
                            for s in systems
                            if SYSTEMS[s].import_name and s not in skipped
                        }
                        | {"anyio", "asyncio"}
                    )
                    if not imports and not runners:
                        # Warm the bytecode cache (not counted). Runners, when there are
                        # any, have already imported every module through the same cache.
                        for module in modules:
                            _import_once(module, "", pycache)
                    k = (rep + si) % len(modules)
                    modules = modules[k:] + modules[:k]
                    for _ in range(params.import_runs):
                        for module in modules:
                            imports.append({"rep": rep, **measure_import(module, pycache)})
                    meds = report.summarise([], imports)["import"]["rows"]
                    log(
                        f"[{rep + 1}/{repeat}] import     "
                        + ", ".join(
                            f"{m} {report.fmt(r['cumulative_ms'])} ms" for m, r in meds.items()
                        )
                    )
                    continue
                names = [s for s in systems if applies(SYSTEMS[s], scenario)]
                if not names:
                    continue
                k = (rep + si) % len(names)
                names = names[k:] + names[:k]
                for order, name in enumerate(names):
                    runner = get_runner(name)
                    if runner is None:
                        continue
                    entry: dict[str, Any] = {
                        "scenario": scenario,
                        "system": name,
                        "rep": rep,
                        "order": order,
                    }
                    t0 = time.perf_counter()
                    meter = _procs.CpuMeter()
                    limit = command_timeout(scenario, params, args.quick)
                    try:
                        runner.send({"op": "run", "scenario": scenario, "params": params.as_dict()})
                        reply = runner.read(limit)
                    except (TimeoutError, RunnerDied, OSError) as exc:
                        reply = {"error": f"{type(exc).__name__}: {exc}"}
                        runner.kill()
                        del runners[name]
                    entry.update(reply)
                    entry["seconds"] = time.perf_counter() - t0
                    entry["foreign_cpu"] = meter.foreign()
                    raw.append(entry)
                    status = (
                        report.brief(scenario, reply["result"])
                        if "result" in reply
                        else "ERROR " + reply["error"]
                    )
                    foreign = entry["foreign_cpu"]
                    if foreign is not None and foreign > CONTENDED:
                        status += f" [other processes used {foreign:.0%} of the CPUs]"
                    if reply.get("lingering"):
                        status += f" [killed {len(reply['lingering'])} lingering process(es)]"
                    log(
                        f"[{rep + 1}/{repeat}] {scenario:10} {name:22} {status}"
                        f" ({entry['seconds']:.1f} s)"
                    )
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: killing runners; partial results follow")
    finally:
        for runner in [*runners.values(), *starting.values()]:
            if interrupted:
                runner.kill()
            else:
                runner.close()
        # Anything re-parented to us (we are a subreaper) is a leftover worker: kill it.
        _procs.kill_pids(_procs.descendants(os.getpid()))
        _procs.reap_zombies()

    summary = report.summarise(raw, imports, CONTENDED)
    title = (
        f"offload benchmarks: Python {platform.python_version()}, {os.cpu_count()} cpus,"
        f" loop={args.loop}, repeat={repeat}{', quick' if args.quick else ''}"
    )
    print(title)
    if busy_before is not None:
        note = " (other processes were running: expect noise)" if busy_before > 0.15 else ""
        print(f"machine: {busy_before:.0%} of CPU busy in the 0.5 s before the run{note}")
    if versions:
        print("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items() if v))
    for name, why in skipped.items():
        print(f"skipped {name}: {why}")
    contended = [e for e in raw if (e.get("foreign_cpu") or 0) > CONTENDED]
    if contended:
        print(
            f"contended: {len(contended)} of {len(raw)} measurements ran while other processes"
            f" used > {CONTENDED:.0%} of the CPUs (marked ! in the tables): "
            + ", ".join(
                f"{e['scenario']}/{e['system']}#{e['rep'] + 1} {e['foreign_cpu']:.0%}"
                for e in contended[:12]
            )
            + (" ..." if len(contended) > 12 else "")
        )
    errors = [e for e in raw if "error" in e]
    for e in errors:
        print(f"error in {e['scenario']}/{e['system']} rep {e['rep'] + 1}: {e['error']}")
    print(report.render(summary, params.as_dict()))
    elapsed = time.perf_counter() - t_start
    print(f"\ntotal {elapsed:.1f} s; runner logs in {logdir}")

    if args.json:
        doc = {
            "meta": {
                "python": platform.python_version(),
                "implementation": platform.python_implementation(),
                "platform": platform.platform(),
                "cpus": os.cpu_count(),
                "loop": args.loop,
                "repeat": repeat,
                "quick": args.quick,
                "scenarios": scenarios,
                "systems": systems,
                "versions": versions,
                "skipped": skipped,
                "date": datetime.datetime.now(datetime.UTC).isoformat(),
                "seconds": elapsed,
                "cpu_busy_before": busy_before,
            },
            "params": params.as_dict(),
            "raw": raw,
            "imports": imports,
            "summary": summary,
        }
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
        print(f"json: {args.json}")
    if args.chart:
        try:
            report.chart(summary, args.chart, title)
            print(f"chart: {args.chart}")
        except ImportError as exc:
            print(f"chart skipped: matplotlib is not installed ({exc})")
    return 130 if interrupted else 0


def merge_runs(
    paths: list[str], chart_path: str | None, systems: str | None, scenarios: str | None
) -> int:
    """Tables (and a chart) of several saved runs, e.g. Python 3.13 and 3.14, side by side;
    ``systems`` and ``scenarios`` (comma-separated) keep only those rows and sections."""
    runs = []
    for path in paths:
        with open(path) as f:
            doc = json.load(f)
        runs.append((doc["meta"]["python"], doc))
    # Summaries are made again from the raw samples, with this version's report code.
    merged = report.merge_summaries(
        [(python, report.summarise(doc["raw"], doc["imports"], CONTENDED)) for python, doc in runs]
    )
    keep = {x.strip() for x in systems.split(",")} if systems else None
    sections = {x.strip() for x in scenarios.split(",")} if scenarios else None
    for name in list(merged):
        if name != "targets" and sections is not None and name not in sections:
            del merged[name]
        elif name != "targets" and keep is not None and name != "import":
            rows = merged[name]["rows"]
            merged[name]["rows"] = {k: v for k, v in rows.items() if report.base(k) in keep}
    merged["targets"] = [
        t
        for t in merged["targets"]
        if (sections is None or t["scenario"] in sections)
        and (keep is None or report.base(t["system"]) in keep or t["scenario"] == "import")
    ]
    pythons = ", ".join(
        f"{python} ({doc['meta']['date'][:16]}, repeat={doc['meta']['repeat']})"
        for python, doc in runs
    )
    title = f"offload benchmarks, {len(runs)} runs: Python {pythons}"
    print(title)
    print("rows are system@python; every ratio is taken within its own run")
    print(report.render(merged, runs[0][1]["params"]))
    if chart_path:
        report.chart(merged, chart_path, title)
        print(f"chart: {chart_path}")
    return 0
