"""Run ``nvflare simulator`` in a subprocess, restarting it when FLARE 2.9's simulator loses a client at start-up.

FLARE is not imported here: the simulator is a command. Its start-up has races that are not ours and that turn a
run into a failure or, worse, a hang (the server then waits for the lost client for ever). Seen on these
machines: a client subprocess that cannot bind its port ("Address already in use"), after which the simulator
logs "Failed to create connection to the child process" and waits; and a client that lost its server and asks it
for a task, in vain, twice a second until the run is killed. :func:`run_simulator` watches the workspace's logs
and the simulator's output while it runs; on one of these signs it kills the simulator's process group at once
and starts again in a fresh workspace, a bounded number of times. A third race, two clients started under one
name, is closed rather than retried: the simulator runs through :mod:`benchmarks.simulator_launcher`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

# Each of these, in any log of the workspace, means that a client was lost before the job started properly.
START_RACES = (
    "Failed to create connection to the child process in SimulatorClientRunner",
)
# This one, logged without a pause for STALL_SECONDS, means that a client lost its server: seen here as a client
# asking for a task twice a second for minutes while the job waited for it (healthy clients wait with TRY_AGAIN,
# which logs nothing).
STALLS = ("Failed to get_task from",)
STALL_SECONDS = 60.0
STALL_GAP_SECONDS = 5.0  # a pause longer than this ends the streak


class StallWatch:
    """True once a :data:`STALLS` message has kept appearing, with no pause over ``gap`` s, for ``seconds``."""

    def __init__(self, seconds: float = STALL_SECONDS, gap: float = STALL_GAP_SECONDS):
        self.seconds, self.gap, self.first, self.last = seconds, gap, None, None

    def stalled(self, text: str, now: float) -> bool:
        if any(m in text for m in STALLS):
            if self.first is None or now - self.last > self.gap:
                self.first = now
            self.last = now
        return self.first is not None and now - self.last <= self.gap and self.last - self.first >= self.seconds


class SimulatorTimeout(RuntimeError):
    """The simulator ran past its time limit (it was killed)."""


@dataclass
class SimulatorRun:
    """The last attempt of :func:`run_simulator`; ``restarts`` names why earlier attempts were abandoned."""

    returncode: int
    output: str
    workspace: Path
    seconds: float  # the last attempt (earlier ones were abandoned at start-up)
    restarts: list[str] = field(default_factory=list)

    def logs(self) -> str:
        """The simulator's own output and every ``log.txt`` of the workspace."""
        return self.output + "".join(p.read_text(errors="replace") for p in sorted(self.workspace.rglob("log.txt")))


def nvflare_command() -> list[str]:
    """``nvflare`` of this Python, through :mod:`benchmarks.simulator_launcher` (FLARE's client race closed)."""
    if not Path(sys.executable).with_name("nvflare").exists():
        raise RuntimeError(f"nvflare is not installed beside {sys.executable} (pip install nvflare==2.9.0)")
    return [sys.executable, str(Path(__file__).with_name("simulator_launcher.py"))]


class LogWatch:
    """Reads only what was appended to the workspace's ``log.txt`` files (and ``extra`` files) since the last look."""

    def __init__(self, workspace: Path, extra: tuple[Path, ...] = ()):
        self.workspace, self.extra, self.offsets = workspace, extra, {}

    def new_text(self) -> str:
        chunks = []
        for path in [*self.workspace.rglob("log.txt"), *self.extra]:
            try:
                with open(path, "rb") as f:
                    f.seek(self.offsets.get(path, 0))
                    data = f.read()
            except OSError:
                continue
            self.offsets[path] = self.offsets.get(path, 0) + len(data)
            chunks.append(data.decode(errors="replace"))
        return "".join(chunks)


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the simulator, its client processes and their children
    except ProcessLookupError:
        pass
    proc.wait()


def run_simulator(job: str | Path, workspace: str | Path, n_clients: int | None = None, threads: int | None = None,
                  env: dict | None = None, timeout: float = 3600, restarts: int = 2,
                  poll_seconds: float = 1.0, nvflare: str | None = None,
                  stall_seconds: float = STALL_SECONDS) -> SimulatorRun:
    """``nvflare simulator JOB -w WORKSPACE [-n N] [-t THREADS]`` (no ``-n``: the sites of the job's deploy_map;
    threads default: all clients at once); returns its return code and output (it does not raise on a failed
    job). The workspace gets FUSS's class allow list first (``fuss_flare.site_policy``), as every FLARE
    participant needs it for jobs without custom code. A start-up race (:data:`START_RACES`) restarts it in
    ``<workspace>_restart<k>``, at most ``restarts`` times; so does a client that lost its server (:data:`STALLS`
    for ``stall_seconds``). Raises :class:`SimulatorTimeout` after ``timeout``
    seconds of all attempts together. ``nvflare``: the executable (default: the one beside this Python, through
    :mod:`benchmarks.simulator_launcher`)."""
    from fuss_flare import site_policy

    workspace = Path(workspace)
    cmd = [*([nvflare] if nvflare else nvflare_command()), "simulator", str(job)]
    if n_clients:
        cmd += ["-n", str(n_clients)]
    cmd += ["-t", str(threads or n_clients or _deployed_sites(Path(job)))]
    started = time.perf_counter()
    reasons: list[str] = []
    for attempt in range(restarts + 1):
        ws = workspace if attempt == 0 else workspace.with_name(f"{workspace.name}_restart{attempt}")
        ws.mkdir(parents=True, exist_ok=True)
        site_policy.install(ws)
        out_file = ws.with_name(ws.name + ".out")
        watch, race, attempt_started = LogWatch(ws, (out_file,)), None, time.perf_counter()
        stall = StallWatch(stall_seconds)
        with open(out_file, "w") as out:
            proc = subprocess.Popen(cmd + ["-w", str(ws)], stdout=out, stderr=subprocess.STDOUT,
                                    env={**os.environ, **(env or {})}, start_new_session=True)
            while proc.poll() is None:
                time.sleep(poll_seconds)
                text = watch.new_text()
                race = next((m for m in START_RACES if m in text), None)
                if race is None and stall.stalled(text, time.perf_counter()):
                    race = f"a client lost its server ({STALLS[0]!r} for {stall_seconds:.0f} s)"
                if race:
                    kill_group(proc)
                    break
                if time.perf_counter() - started > timeout:
                    kill_group(proc)
                    raise SimulatorTimeout(f"nvflare simulator {job} ran past {timeout:.0f} s and was killed; "
                                           f"workspace {ws}:\n{out_file.read_text(errors='replace')[-3000:]}")
        output = out_file.read_text(errors="replace")
        if race is None and proc.returncode != 0:  # the race may also end the run before the watch saw it
            race = next((m for m in START_RACES if m in output + watch.new_text()), None)
        if race is not None:
            reasons.append(f"attempt {attempt + 1} in {ws}: {race}")
        if race is None or attempt == restarts:
            return SimulatorRun(proc.returncode, output, ws, time.perf_counter() - attempt_started, reasons)
        print(f"nvflare simulator: FLARE race ({race}); restarting in a fresh workspace", file=sys.stderr,
              flush=True)
    raise AssertionError("unreachable")


def _deployed_sites(job: Path) -> int:
    import json

    deploy_map = json.loads((job / "meta.json").read_text()).get("deploy_map", {})
    return max(1, len({s for names in deploy_map.values() for s in names if s.lower() not in ("server", "@all")}))
