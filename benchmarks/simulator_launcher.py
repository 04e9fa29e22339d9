"""``nvflare`` with FLARE 2.9.0's simulator client race closed: ``python benchmarks/simulator_launcher.py simulator
JOB [options]`` takes exactly the arguments of ``nvflare``.

``SimulatorClientRunner.do_one_task`` (nvflare 2.9.0) writes the client's name into one build context that all its
client threads share, and sends that context to the new client process a moment later. The threads start together
and poll for their client processes once a second, so two of them often reach that point together: both send the
same name, and one client process then runs as the other site inside its own FLARE session (seen here: the server
logs "Contribution from s2 REJECTED" for a result whose identity and meta say s1). Each thread here gets its own
copy of the build context. The patch runs on import, so a client runner started with ``spawn`` gets it too.
"""

from __future__ import annotations

import os
import sys
import threading

from nvflare.private.fed.app.simulator.simulator_runner import SimulatorClientRunner

_per_thread = threading.local()


def _build_ctx(runner):
    copies = _per_thread.__dict__.setdefault("copies", {})
    if id(runner) not in copies:
        shared = runner.__dict__.get("_shared_build_ctx")
        copies[id(runner)] = None if shared is None else dict(shared)
    return copies[id(runner)]


def _set_build_ctx(runner, value):
    runner.__dict__["_shared_build_ctx"] = value
    _per_thread.__dict__.get("copies", {}).pop(id(runner), None)


SimulatorClientRunner.build_ctx = property(_build_ctx, _set_build_ctx)


def main(argv: list[str] | None = None) -> None:
    from nvflare.cli import main as nvflare_main

    sys.argv = ["nvflare", *(sys.argv[1:] if argv is None else argv)]
    nvflare_main()


if __name__ == "__main__":
    if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
        sys.path.pop(0)  # this folder's modules are not FLARE's imports
    main()
