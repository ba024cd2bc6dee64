"""tools/stress.py, bench.py, serverbench.py and nbdbench.py, run the way a user runs them.

Each script runs in a subprocess with this interpreter, as after the
README's install, on a short budget: the stress storms for half a second
each (the fault-injection storm too, with and without a SIGINT storm, and
the queue storm on its own), the bench on its smallest case and on the
queue hand-off with tiny counts, the server bench for one short round of
three servers (skipped without redis-benchmark), and the NBD bench for one
--quick round of corun and nbdkit (skipped without qemu-img, nbdcopy or
nbdkit). In-process tests force a failing invariant (of the mutex storm,
of the faults storm, of the queue storm) to check that it is named and
fails the exit status, and one sends
Ctrl-C to check that the summary still comes out. The command lines are checked in-process
without running anything: each stress command's --help lists its own
options and its --json keys, options that do not apply and values out of
range are refused with a message naming them, and bench.py's --plot path
is checked before any case runs.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
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


def load_tool(monkeypatch: pytest.MonkeyPatch, script: str) -> ModuleType:
    """Import tools/<script> (not a package) for the length of one test."""
    name = f"corun_tools_{Path(script).stem}"
    spec = importlib.util.spec_from_file_location(name, TOOLS / script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look it up there
    spec.loader.exec_module(module)
    return module


def load_stress(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    return load_tool(monkeypatch, "stress.py")


def load_bench(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    return load_tool(monkeypatch, "bench.py")


def stress_help(stress: ModuleType, command: str) -> str:
    """`stress.py COMMAND --help`, with its lines joined (argparse wraps them)."""
    parser = stress.build_parsers()[1][command]
    return " ".join(parser.format_help().split())


def assert_json_keys_explained(
    monkeypatch: pytest.MonkeyPatch, command: str, runs: list[dict[str, Any]]
) -> None:
    """Every key of the runs' --json objects has its line in `COMMAND --help`."""
    stress = load_stress(monkeypatch)
    epilog = stress.build_parsers()[1][command].epilog
    for run in runs:
        for key in run:
            assert re.search(rf"^  {re.escape(key)}( |$)", epilog, re.M), (command, key)


@pytest.mark.timeout(40)
def test_stress_all_short_run_passes_every_invariant(monkeypatch: pytest.MonkeyPatch) -> None:
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
    # QEMU's storm dies out by design; the stop's wake-ups are not ops.
    assert by_name["schedule/storm"]["dies_out"] is True
    assert by_name["schedule/constant"]["dies_out"] is False
    assert by_name["schedule/storm"]["finish_wakes"] >= 0
    assert by_name["schedule/storm"]["wakes"] == by_name["schedule/storm"]["ops"]
    assert_json_keys_explained(monkeypatch, "all", runs)


@pytest.mark.timeout(20)
def test_bench_switch_prints_a_table() -> None:
    proc = run_tool("bench.py", "--cases", "switch", "--repeat", "1", "--quick", timeout=15)
    assert proc.returncode == 0, proc.stderr
    # The header says which corun ran: compiled or pure Python, GIL or not.
    kernel = "compiled kernel" if corun.compiled else "pure-Python kernel"
    header, blank, *lines = proc.stdout.splitlines()
    assert header.startswith(f"corun {corun.__version__} ({kernel}"), header
    assert header.endswith(("with the GIL", "free-threaded (GIL off)")), header
    assert blank == ""
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
    # --quick: tiny counts, so the verdicts are marked as indicative only.
    assert lines[5].startswith("targets (indicative only: --quick"), lines[5]
    assert re.match(
        r"\s+switch: corun/greenlet >= 0\.8\s+\d+\.\d\d\s+(met|MISSED) \(indicative\)$", lines[6]
    ), lines[6]


@pytest.mark.timeout(20)
def test_bench_json_rows() -> None:
    proc = run_tool(
        "bench.py", "--cases", "switch", "--repeat", "2", "--quick", "--json", timeout=15
    )
    assert proc.returncode == 0, proc.stderr
    objs = [json.loads(line) for line in proc.stdout.splitlines()]
    # First, which corun ran: the same kernel as this process (the same
    # install, the same CORUN_PURE_PYTHON).
    build = objs[0]["build"]
    assert build["kernel"] == ("compiled" if corun.compiled else "pure")
    assert (build["pure_reason"] is None) == corun.compiled
    assert build["gil"] is bool(getattr(sys, "_is_gil_enabled", lambda: True)())
    assert build["corun"] == corun.__version__
    rows = [o for o in objs if "case" in o]
    assert [(r["case"], r["impl"]) for r in rows] == [("switch", "corun"), ("switch", "greenlet")]
    assert all(len(r["runs"]) == 2 and r["median"] > 0 for r in rows)
    assert rows[0]["ratio"] == 1.0
    assert rows[1]["ratio"] == pytest.approx(rows[0]["median"] / rows[1]["median"])
    targets = [o for o in objs if "target" in o]
    assert [o["target"] for o in targets] == ["switch: corun/greenlet >= 0.8"]
    assert targets[0]["indicative"] is True  # --quick


@pytest.mark.timeout(20)
@pytest.mark.parametrize("script", ["stress.py", "bench.py", "serverbench.py", "nbdbench.py"])
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
    # The runs after the interrupted one do not start.
    assert not re.search(r"^schedule/constant ", out, re.M), out


def faults_run(monkeypatch: pytest.MonkeyPatch, *args: str) -> dict[str, Any]:
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
    assert_json_keys_explained(monkeypatch, "faults", [run])
    return run


@pytest.mark.timeout(40)
def test_stress_faults_short_run_passes_every_invariant(monkeypatch: pytest.MonkeyPatch) -> None:
    run = faults_run(monkeypatch, "--seconds", "0.5")
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
def test_stress_faults_with_sigint_storm_passes_every_invariant(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    run = faults_run(monkeypatch, "--seconds", "0.5", "--sigint", "50")
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
def test_stress_queue_short_run_passes_every_invariant(monkeypatch: pytest.MonkeyPatch) -> None:
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
    assert_json_keys_explained(monkeypatch, "queue", [run])


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


@pytest.mark.timeout(60)
@pytest.mark.skipif(
    shutil.which("redis-benchmark") is None,
    reason="redis-benchmark is not installed (Debian: apt-get install redis-tools; "
    ".ci/run installs it)",
)
def test_serverbench_smoke(monkeypatch: pytest.MonkeyPatch) -> None:
    """Three servers, one short round: every request answered, every INCR counted."""
    # The shared parser first: pipelined, inline, and a command still on its way.
    serverbench = load_tool(monkeypatch, "serverbench.py")
    store: dict[bytes, bytes] = {}
    whole = b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$2\r\nv1\r\nPING\r\n*2\r\n$4\r\nINCR\r\n$1\r\nn\r\n"
    partial = b"*2\r\n$3\r\nGET"
    assert serverbench.process(whole + partial, store) == (b"+OK\r\n+PONG\r\n:1\r\n", len(whole))
    assert store == {b"k": b"v1", b"n": b"1"}

    proc = run_tool(
        "serverbench.py",
        *("--servers", "corun-1,corun-2,asyncio", "--repeat", "1", "--requests", "2000"),
        "--json",
        timeout=55,
    )
    # Exit status 0: no run failed, and each server's INCR counter was exact.
    assert proc.returncode == 0, proc.stderr
    objs = [json.loads(line) for line in proc.stdout.splitlines()]
    rows = [o for o in objs if "server" in o]
    assert [(r["server"], r["pipeline"]) for r in rows] == [
        (server, p) for server in ("corun-1", "corun-2", "asyncio") for p in (1, 16)
    ]
    for r in rows:
        assert r["error"] is None, r
        assert r["requests"] == (2000 if r["pipeline"] == 1 else 16000)
        assert set(r["median"]) == {"PING_INLINE", "PING_MBULK", "SET", "GET", "INCR"}
        assert min(r["median"].values()) > 0 and r["all"] > 0
    ratios = [(o["numerator"], o["denominator"], o["pipeline"]) for o in objs if "ratio" in o]
    assert ratios == [
        (num, den, p)
        for p in (1, 16)
        for num, den in (("corun-1", "asyncio"), ("corun-2", "corun-1"))
    ]
    assert all(o["target"] == 1.0 and o["met"] in (True, False) for o in objs if "ratio" in o)


NBD_TOOLS = ("qemu-img", "nbdcopy", "nbdkit")
NBD_TOOLS_MISSING = [tool for tool in NBD_TOOLS if shutil.which(tool) is None]


@pytest.mark.timeout(90)
@pytest.mark.skipif(
    bool(NBD_TOOLS_MISSING),
    reason=f"{', '.join(NBD_TOOLS_MISSING)} not installed (nbdbench.py needs qemu-img, "
    "nbdcopy and nbdkit; Debian: apt-get install qemu-utils libnbd-bin nbdkit)",
)
def test_nbdbench_smoke() -> None:
    """corun and nbdkit, one --quick round: every case measured, the data check passed."""
    servers = ("corun-1-inline", "nbdkit")
    proc = run_tool("nbdbench.py", "--quick", "--servers", ",".join(servers), "--json", timeout=85)
    # Exit status 0: every case ran, and corun's copy equals the data file at the end.
    assert proc.returncode == 0, proc.stderr
    objs = [json.loads(line) for line in proc.stdout.splitlines()]
    setup = objs[0]["setup"]
    assert setup["quick"] is True and setup["repeat"] == 1 and setup["size"] == 64 << 20
    corun_argv = setup["servers"]["corun-1-inline"]
    assert "examples/nbdserver.py FILE --port 0 --iothreads 1 --io inline" in corun_argv
    cases = [
        "read-4k-d1", "read-4k-d16", "write-4k-d1", "write-4k-d16",
        "seq-read-c1", "seq-read-c4", "seq-write-c1", "seq-write-c4",
    ]  # fmt: skip
    rows = [o for o in objs if "server" in o]
    assert [(r["server"], r["case"]) for r in rows] == [(s, c) for s in servers for c in cases]
    for r in rows:
        assert r["error"] is None, r
        assert len(r["runs"]) == 1 and r["median"] > 0, r
        assert r["unit"] == ("IOPS" if "4k" in r["case"] else "MB/s")
    ratios = [o for o in objs if "ratio" in o]
    assert [(o["numerator"], o["case"]) for o in ratios] == [("corun-1-inline", c) for c in cases]
    targets = {o["case"]: o["target"] for o in ratios}
    assert targets["read-4k-d1"] is None and targets["write-4k-d16"] == 0.8
    assert targets["seq-read-c1"] == targets["seq-write-c4"] == 0.9
    assert all(o["met"] in (True, False) for o in ratios if o["target"] is not None)


# -- the command lines ---------------------------------------------------------


@pytest.mark.timeout(20)
@pytest.mark.parametrize("script", ["stress.py", "bench.py", "serverbench.py", "nbdbench.py"])
def test_tools_are_executable_scripts(script: str) -> None:
    path = TOOLS / script
    assert path.read_text().startswith("#!/usr/bin/env python3\n")
    assert os.access(path, os.X_OK), f"{script} has no run bit"
    # Run as ./tools/<script>, with this interpreter first on PATH (a venv's bin/).
    bindir = Path(sys.executable).parent
    if not (bindir / "python3").exists():
        pytest.skip(f"no python3 next to {sys.executable}")
    proc = subprocess.run(
        [str(path), "--help"],
        capture_output=True,
        text=True,
        timeout=15,
        cwd=ROOT,
        check=False,
        env={**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}"},
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"usage: {script}")


# The options each stress command takes (the output options, --json --quiet
# -v, go with all of them).
STRESS_OPTIONS = {
    "all": {
        "--seconds",
        "--contexts",
        "--impl",
        "--coroutines",
        "--write-ratio",
        "--producers",
        "--maxsize",
        "--seed",
    },
    "schedule": {"--seconds", "--contexts", "--seed"},
    "mutex": {"--seconds", "--contexts", "--impl", "--coroutines"},
    "rwlock": {"--seconds", "--contexts", "--coroutines", "--write-ratio", "--seed"},
    "fanin": {"--seconds", "--producers"},
    "queue": {"--seconds", "--contexts", "--maxsize", "--seed"},
    "faults": {"--seconds", "--contexts", "--producers", "--faults", "--sigint", "--seed"},
}


def test_stress_top_level_help_lists_the_commands(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    stress = load_stress(monkeypatch)
    assert stress.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: stress.py [-h] COMMAND ...")
    for command in STRESS_OPTIONS:
        assert re.search(rf"^    {command} ", out, re.M), command
    text = " ".join(out.split())
    assert "With no command, runs `all`" in text and "JSON Lines" in text
    # The run options are the commands' own.
    assert set(re.findall(r"^  (?:-\w, )?(--[a-z-]+)", out, re.M)) == {"--help"}


@pytest.mark.parametrize("command", list(STRESS_OPTIONS))
def test_stress_command_help_lists_only_its_options(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    stress = load_stress(monkeypatch)
    assert stress.main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: stress.py {command} ")
    listed = set(re.findall(r"^  (?:-\w, )?(--[a-z-]+)", out, re.M))
    assert listed == STRESS_OPTIONS[command] | {"--help", "--json", "--quiet", "--verbose"}
    text = " ".join(out.split())
    assert "JSON Lines" in text and "exit status: 0" in text
    if command == "schedule":
        assert "QEMU's storm: dies out by design" in text


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["fanin", "--impl", "threading"],
            "--impl does not apply to fanin (it goes with: all, mutex)",
        ),
        (["fanin", "--contexts", "3"], "--contexts does not apply to fanin"),
        (["fanin", "--faults", "0.1"], "--faults does not apply to fanin (it goes with: faults)"),
        (["all", "--sigint", "5"], "--sigint does not apply to all (it goes with: faults)"),
        (["mutex", "--write-ratio", "0.5"], "--write-ratio does not apply to mutex"),
        (["mutex", "--seed=3"], "--seed does not apply to mutex"),
        (["schedule", "--maxsize", "3"], "--maxsize does not apply to schedule"),
        (["faults", "--coroutines", "2"], "--coroutines does not apply to faults"),
        (["--impl", "threading", "queue"], "--impl does not apply to queue"),
        (["rwlock", "--bogus"], "unrecognized arguments: --bogus"),
        (["storm"], "invalid choice: 'storm'"),
    ],
)
def test_stress_refuses_options_that_do_not_apply(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    message: str,
) -> None:
    stress = load_stress(monkeypatch)
    monkeypatch.setattr(stress, "run_storm", None)  # nothing may run
    assert stress.main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert message in err, err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["rwlock", "--write-ratio", "2"],
            "argument --write-ratio: 2 is out of range (allowed: 0 <= R <= 1)",
        ),
        (["all", "--write-ratio", "-0.1"], "argument --write-ratio: -0.1 is out of range"),
        (["schedule", "--seconds", "0"], "argument --seconds: 0 is out of range (allowed: S > 0)"),
        (["schedule", "--seconds", "abc"], "argument --seconds: 'abc' is not a number"),
        (["mutex", "--contexts", "1"], "argument --contexts: 1 is out of range (allowed: N >= 2)"),
        (
            ["mutex", "--coroutines", "0"],
            "argument --coroutines: 0 is out of range (allowed: N >= 1)",
        ),
        (
            ["fanin", "--producers", "0"],
            "argument --producers: 0 is out of range (allowed: N >= 1)",
        ),
        (["queue", "--maxsize", "-1"], "argument --maxsize: -1 is out of range (allowed: N >= 0"),
        (["faults", "--faults", "1"], "argument --faults: 1 is out of range (allowed: 0 <= P < 1)"),
        (["faults", "--faults", "-0.1"], "argument --faults: -0.1 is out of range"),
        (["faults", "--sigint", "-1"], "argument --sigint: -1 is out of range (allowed: N >= 0)"),
        (["mutex", "--impl", "rlock"], "argument --impl: invalid choice: 'rlock'"),
    ],
)
def test_stress_bad_values_get_their_own_message(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    message: str,
) -> None:
    stress = load_stress(monkeypatch)
    monkeypatch.setattr(stress, "run_storm", None)  # nothing may run
    assert stress.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert err.count("error:") == 1


def test_stress_command_line_defaults_and_order(monkeypatch: pytest.MonkeyPatch) -> None:
    stress = load_stress(monkeypatch)
    parse = stress.parse_args
    # No arguments (the README's first command): every storm but faults, 2 s each.
    assert parse([]) == stress.Settings()
    assert [name for name, _, _ in stress.plan(parse([]))] == STRESS_RUNS
    # No command: `all`, with its options; a command may come after its options.
    assert parse(["--seconds", "0.5"]) == stress.Settings(seconds=0.5)
    assert parse(["--seconds", "1", "mutex", "--impl", "threading"]) == stress.Settings(
        command="mutex", seconds=1.0, impl="threading"
    )
    assert parse(["faults", "--faults", "0.1", "--sigint", "3"]) == stress.Settings(
        command="faults", faults=0.1, sigint=3
    )
    assert [name for name, _, _ in stress.plan(parse(["faults", "--sigint", "3"]))] == [
        "faults/sigint"
    ]


@pytest.mark.timeout(30)
def test_stress_schedule_storm_says_it_dies_out_and_counts_agree() -> None:
    proc = run_tool("stress.py", "schedule", "--seconds", "1.1", timeout=25)
    assert proc.returncode == 0, proc.stderr
    live: dict[str, list[str]] = {}
    for line in proc.stderr.splitlines():
        live.setdefault(line.split()[0], []).append(line)
    storm, constant = live["schedule/storm"], live["schedule/constant"]
    # A line per second and one for the totals, which the summary repeats.
    assert len(storm) >= 2 and storm[-1].split("ops/s ")[1].startswith("(whole run)")
    for line in storm:
        assert line.endswith("(QEMU's storm: dies out by design)"), line
    assert not any("dies out" in line for line in constant)
    rows = {line.split()[0]: line.split() for line in proc.stdout.splitlines()[2:4]}
    for name, lines in live.items():
        last_ops = lines[-1].split()[3]
        assert rows[name][3] == last_ops, (name, lines[-1], rows[name])
    notes = proc.stdout.splitlines()[4:]
    assert len(notes) == 1
    assert notes[0].startswith("schedule/storm: QEMU's storm: dies out by design (")


# -- bench.py's command line -----------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--repeat", "0"], "argument --repeat: 0 is out of range (allowed: N >= 1)"),
        (["--scale", "0"], "argument --scale: 0 is out of range (allowed: F > 0)"),
        (["--scale", "x"], "argument --scale: 'x' is not a number"),
        (["--quick", "--scale", "2"], "argument --scale: not allowed with argument --quick"),
        (["--cases", "switch,nope"], "unknown case(s) nope; choose from switch,"),
    ],
)
def test_bench_bad_values_get_their_own_message(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    message: str,
) -> None:
    bench = load_bench(monkeypatch)
    monkeypatch.setattr(bench, "run_case", None)  # nothing may run
    assert bench.main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert message in err, err


def _unwritable_dir() -> str:
    """A directory nobody can create files in, root included (Linux: /sys)."""
    if not os.path.isdir("/sys"):
        pytest.skip("no /sys to try")
    try:
        open("/sys/corun-bench-probe.png", "ab").close()
    except OSError:
        return "/sys"
    os.unlink("/sys/corun-bench-probe.png")
    pytest.skip("/sys is writable here")


@pytest.mark.parametrize("where", ["missing-dir", "a-directory", "unwritable", "bad-format"])
def test_bench_plot_path_is_checked_before_anything_runs(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    where: str,
) -> None:
    bench = load_bench(monkeypatch)
    monkeypatch.setattr(bench, "run_case", None)  # nothing may run
    path, message = {
        "missing-dir": (tmp_path / "nope" / "b.png", "no such directory"),
        "a-directory": (tmp_path, "is a directory"),
        "unwritable": (Path("/sys/corun-bench.png"), "cannot write there"),
        "bad-format": (tmp_path / "b.pngx", "'.pngx' is not a picture format"),
    }[where]
    if where == "unwritable":
        _unwritable_dir()
    if where == "bad-format":
        pytest.importorskip("matplotlib")
    assert bench.main(["--cases", "switch", "--plot", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "running" not in err
    assert err.startswith(f"bench.py: error: --plot {path}: {message}"), err
    assert not (tmp_path / "b.pngx").exists()


def test_bench_plot_needs_matplotlib_before_anything_runs(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    bench = load_bench(monkeypatch)
    monkeypatch.setattr(bench, "run_case", None)  # nothing may run
    find_spec = importlib.util.find_spec

    def without_matplotlib(name: str, *args: Any) -> Any:
        return None if name == "matplotlib" else find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", without_matplotlib)
    assert bench.main(["--plot", str(tmp_path / "b.png")]) == 2
    err = capsys.readouterr().err
    assert "--plot needs matplotlib" in err and "'.[bench]'" in err
    assert list(tmp_path.iterdir()) == []  # the probe left nothing behind


@pytest.mark.timeout(30)
def test_bench_plot_says_where_it_wrote(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    path = tmp_path / "bench.png"
    proc = run_tool(
        "bench.py",
        "--cases",
        "switch",
        "--repeat",
        "1",
        "--quick",
        "--plot",
        str(path),
        timeout=25,
    )
    assert proc.returncode == 0, proc.stderr
    assert path.read_bytes().startswith(b"\x89PNG")
    assert f"plot written to {path}" in proc.stderr


def test_bench_plot_keeps_memory_on_its_own_axes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Throughput (higher is better) and memory (lower is better) never share an axis."""
    pytest.importorskip("matplotlib")
    bench = load_bench(monkeypatch)

    def rows(case: Any, values: list[float]) -> list[Any]:
        out = [
            bench.Row(case, impl, [bench.Sample(v)])
            for impl, v in zip(case.impls, values, strict=True)
        ]
        for row in out:
            row.ratio = values[0] / row.median
        return out

    def impl(key: str) -> Any:
        return bench.Impl(key, key, lambda n: bench.Sample(0.0))

    switch = bench.Case("switch", "switch", 1, [impl("corun"), impl("greenlet")])
    memory = bench.Case(
        "memory", "memory", 1, [impl("corun"), impl("greenlet"), impl("asyncio")], unit="B/object"
    )
    fig = bench.plot_figure([*rows(switch, [5.0, 10.0]), *rows(memory, [6000.0, 6000.0, 800.0])])
    try:
        throughput, mem = fig.axes
        assert "higher is better" in throughput.get_title()
        assert "lower is better" in mem.get_title()
        assert [t.get_text() for t in throughput.get_xticklabels()] == ["switch\nvs greenlet"]
        assert [t.get_text() for t in mem.get_xticklabels()] == [
            "memory\nvs greenlet",
            "memory\nvs asyncio",
        ]
        assert [p.get_height() for p in throughput.patches] == [0.5]
        assert [p.get_height() for p in mem.patches] == [1.0, 7.5]
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)
