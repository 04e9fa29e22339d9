"""benchmarks.simulator: FLARE's simulator start-up races restart the run instead of failing or hanging it.

The races cannot be provoked on demand, so these tests give ``run_simulator`` a stand-in executable (a shell
script with the simulator's command line) that writes the race's log line and then hangs, as the real one did
here (server waiting for the lost client). The real simulator runs through the same function in every FLARE test.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from benchmarks.simulator import START_RACES, STALLS, SimulatorTimeout, run_simulator

# $1 = "simulator", $2 = job, then -n N -t T -w WS. Attempt k (counted in a file beside the job) follows the k-th word of $PLAN:
# "race" writes the race's line into server/log.txt and hangs; "stall" prints a lost client's get_task failure ten
# times a second; "blip" prints three and finishes; "fail" exits 2; "ok" writes a model and exits 0.
STAND_IN = """#!/usr/bin/env bash
ws="${@: -1}"
count="$2.count"
n=$(( $(cat "$count" 2>/dev/null || echo 0) + 1 )); echo $n > "$count"
step=$(echo "$PLAN" | cut -d' ' -f$n)
mkdir -p "$ws/server/simulate_job/app_server"
echo "$(date) simulator starting" > "$ws/server/log.txt"
case "$step" in
  race) sleep 1; echo "ERROR - run_client_thread error: RuntimeError: $RACE, timeout: 60.0" >> "$ws/server/log.txt";
        sleep 600 ;;
  stall) for i in $(seq 6000); do echo "WARNING - Failed to get_task from server. Will try it again."; sleep 0.1; done ;;
  blip) for i in 1 2 3; do echo "WARNING - Failed to get_task from server. Will try it again."; done; sleep 3;
        echo done > "$ws/server/simulate_job/app_server/fuss_model.pt"; echo "finished"; exit 0 ;;
  fail) echo "client raised" ; exit 2 ;;
  ok)   echo done > "$ws/server/simulate_job/app_server/fuss_model.pt"; echo "finished"; exit 0 ;;
esac
"""


@pytest.fixture
def stand_in(tmp_path: Path):
    exe = tmp_path / "nvflare"
    exe.write_text(STAND_IN)
    exe.chmod(0o755)

    def run(plan: str, **kwargs):
        env = {"PLAN": plan, "RACE": START_RACES[0]}
        return run_simulator(tmp_path / "job", tmp_path / "ws", 2, env=env, nvflare=str(exe), poll_seconds=0.2,
                             **kwargs)
    return run


def test_a_start_up_race_kills_the_hung_run_and_restarts_it(stand_in, tmp_path):
    started = time.perf_counter()
    run = stand_in("race ok")
    assert time.perf_counter() - started < 30  # the hung first attempt (sleep 600) was killed, not waited for
    assert run.returncode == 0 and "finished" in run.output
    assert run.workspace == tmp_path / "ws_restart1" and (run.workspace / "server/simulate_job/app_server").is_dir()
    assert len(run.restarts) == 1 and START_RACES[0] in run.restarts[0] and str(tmp_path / "ws") in run.restarts[0]
    assert (tmp_path / "job.count").read_text().strip() == "2"


def test_restarts_are_bounded_and_a_real_failure_is_not_retried(stand_in, tmp_path):
    run = stand_in("race race race ok", restarts=2)
    assert run.returncode != 0 and len(run.restarts) == 3  # three attempts, all lost; the 4th never started
    assert (tmp_path / "job.count").read_text().strip() == "3"
    os.remove(tmp_path / "job.count")
    failed = stand_in("fail ok")
    assert failed.returncode == 2 and failed.restarts == [] and "client raised" in failed.output
    assert (tmp_path / "job.count").read_text().strip() == "1"


def test_a_hang_without_a_known_race_ends_at_the_timeout(tmp_path):
    exe = tmp_path / "nvflare"
    exe.write_text("#!/usr/bin/env bash\nsleep 600\n")
    exe.chmod(0o755)
    started = time.perf_counter()
    with pytest.raises(SimulatorTimeout, match="ran past 2 s"):
        run_simulator(tmp_path / "job", tmp_path / "ws", 2, timeout=2, nvflare=str(exe), poll_seconds=0.2)
    assert time.perf_counter() - started < 15


def test_a_client_that_lost_its_server_restarts_the_run_but_a_short_blip_does_not(stand_in, tmp_path):
    started = time.perf_counter()
    run = stand_in("stall ok", stall_seconds=2)
    assert time.perf_counter() - started < 30  # the endless get_task failures were cut after about 2 s
    assert run.returncode == 0 and run.workspace == tmp_path / "ws_restart1"
    assert len(run.restarts) == 1 and "lost its server" in run.restarts[0] and STALLS[0] in run.restarts[0]
    os.remove(tmp_path / "job.count")
    blip = stand_in("blip ok", stall_seconds=2)
    assert blip.returncode == 0 and blip.restarts == [] and blip.workspace == tmp_path / "ws"
    assert (tmp_path / "job.count").read_text().strip() == "1"


def _one_task_each(holder, names=("s1", "s2")) -> dict:
    """Two client threads doing what FLARE 2.9.0's ``do_one_task`` does with ``holder.build_ctx``: write the
    client's name, then (after the other thread has written too, as when both client processes answer on the same
    poll) send the context."""
    import threading

    barrier, sent = threading.Barrier(len(names)), {}

    def one_task(name):
        holder.build_ctx["client_name"] = name
        barrier.wait()
        sent[name] = dict(holder.build_ctx)

    threads = [threading.Thread(target=one_task, args=(name,)) for name in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sent


def test_the_launcher_gives_each_simulator_client_thread_its_own_build_context():
    import inspect
    from types import SimpleNamespace

    from nvflare.private.fed.app.simulator.simulator_runner import SimulatorClientRunner

    import benchmarks.simulator_launcher  # noqa: F401  patches SimulatorClientRunner on import

    # FLARE still writes the name into the runner's context and sends that context (else the patch is moot)
    source = inspect.getsource(SimulatorClientRunner.do_one_task)
    assert 'self.build_ctx["client_name"] = client.client_name' in source
    assert "SimulatorConstants.BUILD_CTX: self.build_ctx" in source
    # a shared context sends one name to both client processes; the launcher's runner sends each its own
    shared = _one_task_each(SimpleNamespace(build_ctx={"client_name": None, "site_type": "client"}))
    assert shared["s1"]["client_name"] == shared["s2"]["client_name"]
    runner = SimulatorClientRunner.__new__(SimulatorClientRunner)
    runner.build_ctx = {"client_name": None, "site_type": "client"}
    assert _one_task_each(runner) == {"s1": {"client_name": "s1", "site_type": "client"},
                                      "s2": {"client_name": "s2", "site_type": "client"}}
