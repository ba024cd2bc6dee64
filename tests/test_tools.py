"""tools/stress.py and tools/bench.py, run the way a user runs them.

Each script runs in a subprocess with this interpreter, as after the
README's install, on a short budget: the stress storms for half a second
each, the bench on its smallest case with tiny counts. One in-process test
forces a failing invariant to check that it is named and fails the exit
status, and one sends Ctrl-C to check that the summary still comes out.
"""

from __future__ import annotations

import importlib.util
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ROOT / "tools"

STRESS_RUNS = [
    "schedule/storm",
    "schedule/constant",
    "mutex/contended",
    "mutex/handoff",
    "rwlock",
    "fanin",
]


def run_tool(script: str, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(TOOLS / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        check=False,
    )


def load_stress(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """Import tools/stress.py (not a package) for the length of one test."""
    spec = importlib.util.spec_from_file_location("corun_tools_stress", TOOLS / "stress.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look it up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.timeout(40)
def test_stress_all_short_run_passes_every_invariant() -> None:
    proc = run_tool("stress.py", "all", "--seconds", "0.5", "--json", "--quiet", timeout=35)
    assert proc.returncode == 0, proc.stderr
    runs = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    assert [r["run"] for r in runs] == STRESS_RUNS
    for r in runs:
        assert r["skipped"] is None, r
        assert r["checks_total"] >= 5, r
        failed = [c for c in r["checks"] if not c["passed"]]
        assert failed == [], (r["run"], failed)
        assert r["checks_passed"] == r["checks_total"]
        assert r["ok"] is True
        assert r["interrupted"] is False
    by_name = {r["run"]: r for r in runs}
    # The runs that are meant to keep traffic flowing did.
    for name in ("schedule/constant", "mutex/contended", "mutex/handoff", "rwlock", "fanin"):
        assert by_name[name]["ops"] > 0, by_name[name]
    assert by_name["schedule/constant"]["wakes"] == by_name["schedule/constant"]["ops"]


@pytest.mark.timeout(20)
def test_bench_switch_prints_a_table() -> None:
    proc = run_tool("bench.py", "--cases", "switch", "--repeat", "1", "--quick", timeout=15)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["case", "implementation", "median", "spread", "corun/this", "notes"]
    assert set(lines[1].replace(" ", "")) == {"-"}
    rows = lines[2:4]
    assert rows[0].startswith("switch ") and "corun: yield_() + co.enter()" in rows[0]
    assert "greenlet" in rows[1]
    for row in rows:
        match = re.search(r"([\d,]+) ops/s\s+-\s+(\d+\.\d\d)", row)
        assert match is not None, row
        assert int(match.group(1).replace(",", "")) > 0
    assert re.search(r"1\.00\s+reference$", rows[0])
    assert lines[4] == ""
    assert lines[5] == "targets:"
    assert re.match(r"\s+switch: corun/greenlet >= 0\.8\s+\d+\.\d\d\s+(met|MISSED)$", lines[6])


@pytest.mark.timeout(20)
def test_bench_json_rows() -> None:
    proc = run_tool(
        "bench.py", "--cases", "switch", "--repeat", "2", "--quick", "--json", timeout=15
    )
    assert proc.returncode == 0, proc.stderr
    objs = [json.loads(line) for line in proc.stdout.splitlines()]
    rows = [o for o in objs if "case" in o]
    assert [(r["case"], r["impl"]) for r in rows] == [("switch", "corun"), ("switch", "greenlet")]
    assert all(len(r["runs"]) == 2 and r["median"] > 0 for r in rows)
    assert rows[0]["ratio"] == 1.0
    assert rows[1]["ratio"] == pytest.approx(rows[0]["median"] / rows[1]["median"])
    assert [o["target"] for o in objs if "target" in o] == ["switch: corun/greenlet >= 0.8"]


@pytest.mark.timeout(20)
@pytest.mark.parametrize("script", ["stress.py", "bench.py"])
def test_help(script: str) -> None:
    proc = run_tool(script, "--help", timeout=15)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"usage: {script}")


@pytest.mark.timeout(30)
def test_stress_names_a_failed_invariant_and_exits_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    stress = load_stress(monkeypatch)
    real_checks = stress.MutexStorm.checks

    def broken_checks(self: object) -> list[object]:
        return [*real_checks(self), stress.Check("counter == atomic_counter", False, "1 != 2")]

    monkeypatch.setattr(stress.MutexStorm, "checks", broken_checks)
    assert stress.main(["mutex", "--seconds", "0.2", "--quiet"]) == 1
    out, err = capsys.readouterr()
    assert re.search(r"^mutex/contended .* FAIL$", out, re.M)
    assert "FAILED mutex/contended: counter == atomic_counter: 1 != 2" in err
    assert "FAILED mutex/handoff: counter == atomic_counter: 1 != 2" in err


@pytest.mark.timeout(30)
def test_stress_ctrl_c_stops_and_still_prints_the_summary() -> None:
    proc = subprocess.Popen(
        [sys.executable, str(TOOLS / "stress.py"), "schedule", "--seconds", "20"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        # Wait for the first progress line: by then the handler is installed.
        assert proc.stderr is not None
        first = proc.stderr.readline()
        assert first.startswith("schedule/storm"), first
        started = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert time.monotonic() - started < 15
    assert proc.returncode == 130, err
    assert "ok (interrupted)" in out
    assert "schedule/constant" not in out  # the runs after the interrupted one do not start
