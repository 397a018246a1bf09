"""``vantage lab list | run | shell``: the command-line face of the lab."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from probe.lab.netns import LabError
from probe.lab.scenario import Scenario, ScenarioError, load_scenario, shipped_scenarios

EX_FAILED = 1
EX_DATAERR = 65
EX_UNAVAILABLE = 69


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    lab = sub.add_parser("lab", help="the censorship lab: run the probe against a simulated censor")
    lab_sub = lab.add_subparsers(dest="lab_command", required=True)
    lab_sub.add_parser("list", help="scenarios that ship with Vantage")
    run = lab_sub.add_parser("run", help="build, measure, compare, tear down (needs root)")
    run.add_argument("scenarios", nargs="*", metavar="SCENARIO",
                     help="a scenario file, or the name of a shipped one")  # fmt: skip
    run.add_argument("--all", action="store_true", help="every shipped scenario")
    run.add_argument("--json", action="store_true", help="one JSON object per expectation")
    shell = lab_sub.add_parser("shell", help="a shell inside the probe's namespace (needs root)")
    shell.add_argument("scenario", metavar="SCENARIO")


def resolve(arg: str) -> Path:
    path = Path(arg)
    if path.exists():
        return path
    for shipped in shipped_scenarios():
        if shipped.stem == arg or shipped.name == arg:
            return shipped
    raise ScenarioError(f"{arg}: no such scenario file or shipped scenario (see: vantage lab list)")


def _list() -> int:
    table = Table("scenario", "description")
    for path in shipped_scenarios():
        s = load_scenario(path)
        table.add_row(path.stem, escape(s.description))
    Console().print(table)
    return 0


def _report(s: Scenario, result: object, as_json: bool, console: Console) -> None:
    from probe.lab.runner import ScenarioResult

    assert isinstance(result, ScenarioResult)
    matched = sum(r.match for r in result.results)
    summary = {"scenario": s.name, "expectations": len(result.results), "matched": matched,
               "ok": result.ok, "probe_seconds": round(result.probe_seconds, 2),
               "measurements": len(result.measurements), "error": result.error}  # fmt: skip
    if as_json:
        for r in result.results:
            sys.stdout.write(json.dumps(r.to_json(s.name)) + "\n")
        sys.stdout.write(json.dumps({"summary": summary}) + "\n")
        sys.stdout.flush()
        return
    table = Table(title=f"{s.name}: {s.description}", title_justify="left")
    for col in ("measurement", "step", "expected", "observed", "ok"):
        table.add_column(col, overflow="fold")
    for r in result.results:
        e = r.expectation
        expected = json.dumps(r.to_json(s.name)["expected"])
        observed = escape(json.dumps(r.observed))
        ok = "[green]yes[/green]" if r.match else "[red]NO[/red]"
        table.add_row(r.measurement, e.step or "verdict", escape(expected), observed, ok)
    console.print(table)
    if result.error:
        console.print(f"[red]error:[/red] {escape(result.error)}")
    console.print(f"{s.name}: {matched}/{len(result.results)} expectations hold "
                  f"(probe ran {result.probe_seconds:.1f}s)", highlight=False)  # fmt: skip


def _run(args: argparse.Namespace) -> int:
    from probe.lab.runner import run_scenario

    paths = shipped_scenarios() if args.all else [resolve(a) for a in args.scenarios]
    if not paths:
        raise ScenarioError("name a scenario (or --all); see: vantage lab list")
    scenarios = [load_scenario(p) for p in paths]  # all parsed before anything is built
    console = Console()
    ok = True
    for s in scenarios:
        result = run_scenario(s)
        _report(s, result, args.json, console)
        ok = ok and result.ok
        if (
            result.error
            and "needs root" in result.error
            or result.error
            and "needs ip" in result.error
        ):
            return EX_UNAVAILABLE
    return 0 if ok else EX_FAILED


def _shell(args: argparse.Namespace) -> int:
    from probe.lab.runner import lab, probe_command

    s = load_scenario(resolve(args.scenario))
    with (
        tempfile.TemporaryDirectory(prefix="vantage-lab-") as tmp,
        lab(s, Path(tmp)) as (topo, plan, ca),
    ):
        cmd = probe_command(topo, plan, s, ca, Path(tmp))
        hint = " ".join(cmd[4:])
        print(f"lab {topo.id}: you are in {topo.probe}. The probe would run:\n  {hint}\n"
              "Exit the shell to tear the lab down.", file=sys.stderr)  # fmt: skip
        subprocess.run(["ip", "netns", "exec", topo.probe, "bash", "-i"], check=False)
    return 0


def main(args: argparse.Namespace) -> int:
    try:
        if args.lab_command == "list":
            return _list()
        if args.lab_command == "run":
            return _run(args)
        return _shell(args)
    except ScenarioError as exc:
        print(f"vantage lab: scenario error: {exc}", file=sys.stderr)
        return EX_DATAERR
    except LabError as exc:
        print(f"vantage lab: {exc}", file=sys.stderr)
        return EX_UNAVAILABLE
