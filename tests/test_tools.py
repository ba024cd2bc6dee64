"""tools/stress.py and tools/bench.py, run the way a user runs them.

Each script runs in a subprocess with this interpreter, as after the
README's install, on a short budget: the stress storms for half a second
each (the fault-injection storm too, with and without a SIGINT storm, and
the queue storm on its own), the bench on its smallest case and on the
queue hand-off with tiny counts. In-process tests force a failing invariant
(of the mutex storm, of the faults storm, of the queue storm) to check that
it is named and fails the exit status, and one sends Ctrl-C to check that
the summary still comes out.
"""

from __future__ import annotations

import importlib.util
import json
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

import corun

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ROOT / "tools"

STRESS_RUNS = [
    "schedule/storm",
    "schedule/constant",
    "mutex/contended",
    "mutex/handoff",
    "rwlock",
    "fanin",
    "queue",
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
    for name in (
        "schedule/constant",
        "mutex/contended",
        "mutex/handoff",
        "rwlock",
        "fanin",
        "queue",
    ):
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


def faults_run(*args: str) -> dict[str, Any]:
    """Run `stress.py faults ... --json --quiet`; return its one JSON object."""
    proc = run_tool("stress.py", "faults", *args, "--json", "--quiet", timeout=35)
    runs = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    assert len(runs) == 1, (proc.stdout, proc.stderr)
    run: dict[str, Any] = runs[0]
    failed = [c for c in run["checks"] if not c["passed"]]
    assert failed == [], (run["run"], failed, proc.stderr[-3000:])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert run["ok"] is True and run["interrupted"] is False and run["skipped"] is None
    assert run["checks_passed"] == run["checks_total"]
    return run


@pytest.mark.timeout(40)
def test_stress_faults_short_run_passes_every_invariant() -> None:
    run = faults_run("--seconds", "0.5")
    assert run["run"] == "faults"
    assert run["fault_rate"] == 0.02
    names = [c["name"] for c in run["checks"]]
    for name in (
        "every accepted item ran exactly once; no refused one ran",
        "every injected fault reported to the handler exactly once",
        "no unexpected exception reached a handler",
        "no IOThread died (each alive and answering call_sync until joined)",
        "every coroutine done; its join gives its value or its own exception",
        "IOThreads joined",
    ):
        assert name in names
    assert run["faults_injected"] > 0
    assert 0 < run["faults_reported"] <= run["faults_injected"]
    assert run["ops"] > 0 and run["refused"] >= 0
    # Every kind of work was submitted, and faults of more than one kind were raised.
    assert all(n > 0 for n in run["items_submitted"].values()), run["items_submitted"]
    assert len(run["faults_by_kind"]) > 1, run["faults_by_kind"]


@pytest.mark.timeout(40)
def test_stress_faults_with_sigint_storm_passes_every_invariant() -> None:
    run = faults_run("--seconds", "0.5", "--sigint", "50")
    assert run["run"] == "faults/sigint"
    names = [c["name"] for c in run["checks"]]
    for name in (
        "every SIGINT came out of the main loop's poll as KeyboardInterrupt",
        "every call_soon accepted on the main-thread context ran exactly once",
        "main-thread context wakeable after the signal storm",
    ):
        assert name in names
    assert run["sigint_sent"] == run["sigint_caught"] == 50
    assert run["main_items"] > 0
    assert run["faults_injected"] > 0


@pytest.mark.timeout(30)
def test_stress_faults_names_a_failed_invariant_and_exits_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    stress = load_stress(monkeypatch)
    # Plain exceptions only, so that this test is about the storm's own
    # accounting; the subprocess runs above raise every kind.
    monkeypatch.setattr(stress, "CALLBACK_FAULTS", (ValueError,))
    monkeypatch.setattr(stress, "COROUTINE_FAULTS", (ValueError,))
    real_handler = stress.FaultStorm.exception_handler
    dropped: list[BaseException] = []

    def lossy_handler(self: object, record: object) -> object:
        handler = real_handler(self, record)

        def drop_one(ctx: object, exc: BaseException, origin: object) -> None:
            # The fault of a callback (a coroutine's may also reach a join).
            from_callback = not isinstance(origin, stress.Coroutine)
            if not dropped and from_callback and getattr(exc, "fault_id", None) is not None:
                dropped.append(exc)  # the handler "never heard" of this one
                return
            handler(ctx, exc, origin)

        self._handler = drop_one  # type: ignore[attr-defined]
        return drop_one

    monkeypatch.setattr(stress.FaultStorm, "exception_handler", lossy_handler)
    assert stress.main(["faults", "--seconds", "0.3", "--faults", "0.2", "--quiet"]) == 1
    out, err = capsys.readouterr()
    assert len(dropped) == 1
    lines = out.splitlines()
    assert lines[0].split()[8:11] == ["injected", "reported", "refused"], lines[0]
    assert re.search(r"^faults .* FAIL$", out, re.M), out
    failures = [line for line in err.splitlines() if line.startswith("FAILED")]
    assert len(failures) == 1, err
    assert failures[0].startswith(
        "FAILED faults: every injected fault reported to the handler exactly once: "
    )
    assert "never: 1, twice or more: 0, never raised: 0" in failures[0]


@pytest.mark.timeout(20)
def test_stress_faults_options_are_checked(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    stress = load_stress(monkeypatch)
    assert stress.main(["faults", "--faults", "1"]) == 2
    assert stress.main(["faults", "--faults", "-0.1"]) == 2
    assert stress.main(["faults", "--sigint", "-1"]) == 2
    assert stress.main(["fanin", "--faults", "0.1"]) == 2
    assert stress.main(["all", "--sigint", "5"]) == 2
    err = capsys.readouterr().err
    assert "--faults must be >= 0 and < 1" in err
    assert "--faults and --sigint go with the faults command" in err
    proc = run_tool("stress.py", "--help", timeout=15)
    assert proc.returncode == 0, proc.stderr
    help_text = " ".join(proc.stdout.split())
    assert "{all,schedule,mutex,rwlock,fanin,queue,faults}" in help_text
    assert "--faults P" in help_text and "--sigint N" in help_text
    assert "Not part of `all`" in help_text


QUEUE_CHECKS = (
    "every item put was received exactly once",
    "per producer, each consumer received its items in put order",
    "qsize() never exceeded maxsize (as observed)",
    "cancelled consumers finished with Cancelled, the others at end of stream",
    "queue empty and closed at the end; no stale waiter left in it",
    "no put or get raised anything unexpected",
    "no IOThread died (each alive and answering call_sync until joined)",
    "every coroutine finished within 10 s",
    "no exception escaped to a context's handler",
    "IOThreads joined",
)


@pytest.mark.timeout(40)
def test_stress_queue_short_run_passes_every_invariant() -> None:
    proc = run_tool("stress.py", "queue", "--seconds", "0.5", "--json", "--quiet", timeout=35)
    runs = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    assert len(runs) == 1, (proc.stdout, proc.stderr)
    run = runs[0]
    failed = [c for c in run["checks"] if not c["passed"]]
    assert failed == [], (failed, proc.stderr[-3000:])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert run["run"] == "queue" and run["ok"] is True and run["skipped"] is None
    assert run["checks_passed"] == run["checks_total"]
    names = [c["name"] for c in run["checks"]]
    for name in QUEUE_CHECKS:
        assert name in names
    assert run["maxsize"] == 16
    assert 0 < run["max_qsize"] <= 16
    # Items flowed, through coroutines and threads alike, and every item put
    # was received (the check above says: exactly once).
    assert run["ops"] == run["items_put"] > 0
    assert 0 < run["received_by_threads"] < run["ops"]
    # Consumers were cancelled (and replaced), and each cancel finished one.
    assert run["cancels"] > 0
    assert run["cancelled"] == run["cancels"]
    assert run["consumers"] > run["cancels"]


@pytest.mark.timeout(30)
def test_stress_queue_names_a_lost_item_and_exits_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    stress = load_stress(monkeypatch)
    once = threading.Lock()

    class LossyQueue(corun.Queue):  # type: ignore[type-arg]
        """Drops one item on its way out: one get() returns the next one instead."""

        __slots__ = ()

        def get(self, timeout: float | None = None) -> Any:
            item = super().get(timeout)
            if once.acquire(False):
                return super().get(timeout)
            return item

    monkeypatch.setattr(stress.QueueStorm, "make_queue", staticmethod(LossyQueue))
    assert stress.main(["queue", "--seconds", "0.3", "--quiet"]) == 1
    out, err = capsys.readouterr()
    assert once.locked()
    lines = out.splitlines()
    assert lines[0].split()[8:12] == ["cancels", "get", "t/o", "put"], lines[0]
    assert re.search(r"^queue .* FAIL$", out, re.M), out
    failures = [line for line in err.splitlines() if line.startswith("FAILED")]
    assert len(failures) == 1, err
    assert failures[0].startswith("FAILED queue: every item put was received exactly once: ")
    assert "never: 1, more than once: 0, never put: 0" in failures[0]


@pytest.mark.timeout(20)
def test_stress_queue_options_are_checked(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    stress = load_stress(monkeypatch)
    assert stress.main(["queue", "--maxsize", "-1"]) == 2
    assert "--maxsize must be >= 0" in capsys.readouterr().err


@pytest.mark.timeout(40)
def test_bench_queue_cases_count_every_item() -> None:
    proc = run_tool(
        "bench.py", "--cases", "queue", "--repeat", "1", "--quick", "--json", timeout=35
    )
    assert proc.returncode == 0, proc.stderr
    objs = [json.loads(line) for line in proc.stdout.splitlines()]
    rows = [o for o in objs if "case" in o]
    impls = ["corun", "threading", "asyncio", "uvloop", "gevent", "aiologic"]
    assert [(r["case"], r["impl"]) for r in rows] == [
        (case, impl) for case in ("queue/bounded", "queue/unbounded") for impl in impls
    ]
    for r in rows:
        # An implementation raises (error) unless its consumer got every item, in order.
        assert r["error"] is None, r
        if r["skipped"] is None:
            assert len(r["runs"]) == 1 and r["median"] > 0, r
    assert rows[0]["label"].startswith("corun: Queue(64)")
    assert rows[6]["label"].startswith("corun: Queue()")
    assert rows[0]["ratio"] == 1.0 and rows[0]["extra"]["fd_writes_per_1k"] >= 0
    assert [o["target"] for o in objs if "target" in o] == [
        "queue/bounded: corun/aiologic >= 1",
        "queue/bounded: corun/threading >= 0.5",
        "queue/unbounded: corun/aiologic >= 1",
        "queue/unbounded: corun/threading >= 0.5",
    ]
