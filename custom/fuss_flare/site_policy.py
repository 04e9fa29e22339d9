"""What a FUSS participant (a site, the server, or the simulator's workspace) configures so that it runs FUSS jobs
and nothing else: the classes a job may name, and who may ship code.

FUSS jobs carry configuration only; the classes they name come from the ``fuss_flare`` package installed on the
participant. FLARE 2.9 builds a component of a job without custom code only when its class is in the
participant's ``class_allow_list`` (``local/resources.json``, ``ComponentPathAuthorizer``), so this list is the
site's statement of which installed code a job may run. It holds exactly the classes FUSS jobs and the site's
privacy policy use; FLARE's ``ConvertToFedEvent`` is left out on purpose, so a job cannot forward analytics
around ``FussAnalyticsForwarder``'s policy.

Custom code (FLARE's BYOC: a job folder with a ``custom/`` folder) is governed by the site's
``local/authorization.json``; :data:`HOSPITAL_AUTHORIZATION` grants it to nobody, so a job that ships a
``fuss_flare/filters.py`` of its own is refused by the site before any of its code is imported. Such a kit's
``local/fuss_policy.json`` also owns the keys that say where the site's data, partition, cache and weights are
(``site_owned``: a job's value for them is ignored where the site sets its own in ``$FUSS_SITE_CONFIG``, and
refused where it does not; ``fuss_components.disclosure.site_config``).

GPUs: FLARE hands a site's GPUs to jobs through the ``GPUResourceManager`` in ``local/resources.json``; a job whose
``meta.json`` asks for one (``resource_spec``, from ``federation.site_gpu_memory_gb``) starts only where it is
free, and the ``GPUResourceConsumer`` gives the job's process that GPU (``CUDA_VISIBLE_DEVICES``). This tool writes
both, with the GPUs this machine has (or ``--gpus`` / ``--gpu-memory``); a site without a GPU keeps what its kit
configures.

    python -m fuss_flare.site_policy simulator_workspace          # the simulator's workspace (its local/)
    python -m fuss_flare.site_policy <kit> --no-byoc              # a provisioned site's startup kit
    python -m fuss_flare.site_policy <kit> --gpus 2 --gpu-memory 40
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

CLASS_ALLOW_LIST = [
    # the FUSS components (server and sites), installed with this package
    "fuss_flare.aggregator.FussAggregator",
    "fuss_flare.controller.FussController",
    "fuss_flare.executor.FussExecutor",
    "fuss_flare.filters.CentroidPrivacyFilter",
    "fuss_flare.filters.FussAnalyticsForwarder",
    "fuss_flare.filters.FussResultFilter",
    "fuss_flare.persistor.FussModelPersistor",
    "fuss_flare.recorder.FussRecorder",
    # FLARE classes a FUSS job or a site's privacy.json names
    "nvflare.app_common.filters.exclude_vars.ExcludeVars",
    "nvflare.app_common.shareablegenerators.full_model_shareable_generator.FullModelShareableGenerator",
    "nvflare.app_opt.tracking.tb.tb_receiver.TBAnalyticsReceiver",
    "nvflare.app_opt.tracking.mlflow.mlflow_receiver.MLflowReceiver",  # jobs exported with --mlflow
]

# The rights FLARE's default policy gives each role, with custom code (byoc) for nobody.
_ROLE_RIGHTS = {
    "submit_job": "any", "clone_job": "n:submitter", "manage_job": "n:submitter", "download_job": "n:submitter",
    "view": "any", "operate": "o:site", "shell_commands": "o:site", "byoc": "none",
    "server-predeployed-flwr": "none",
}
HOSPITAL_AUTHORIZATION = {
    "format_version": "1.0",
    "permissions": {
        "project_admin": {**_ROLE_RIGHTS, "clone_job": "any", "manage_job": "any", "download_job": "any",
                          "operate": "any", "shell_commands": "any"},
        "org_admin": {**_ROLE_RIGHTS, "submit_job": "none", "clone_job": "none", "manage_job": "o:submitter",
                      "download_job": "o:submitter"},
        "lead": dict(_ROLE_RIGHTS),
        "member": {"view": "any"},
    },
}


GPU_RESOURCE_MANAGER = "nvflare.app_common.resource_managers.gpu_resource_manager.GPUResourceManager"
GPU_RESOURCE_CONSUMER = "nvflare.app_common.resource_consumers.gpu_resource_consumer.GPUResourceConsumer"


def host_gpus() -> tuple[int, float]:
    """(number of GPUs, GiB of the smallest) on this machine; (0, 0.0) without CUDA."""
    try:
        import torch

        count = torch.cuda.device_count()
        if not count:
            return 0, 0.0
        return count, min(torch.cuda.get_device_properties(i).total_memory for i in range(count)) / (1 << 30)
    except Exception:  # no torch with CUDA, no driver
        return 0, 0.0


def gpu_components(num_gpus: int, memory_gib: float) -> list[dict]:
    """The ``resources.json`` components that hand ``num_gpus`` GPUs of ``memory_gib`` GiB each to jobs."""
    return [{"id": "resource_manager", "path": GPU_RESOURCE_MANAGER,
             "args": {"num_of_gpus": num_gpus, "mem_per_gpu_in_GiB": round(memory_gib, 1),
                      "expiration_period": 300}},
            {"id": "resource_consumer", "path": GPU_RESOURCE_CONSUMER, "args": {}}]


def install(participant: str | Path, byoc: bool = True, gpus: tuple[int, float] | None = None) -> list[Path]:
    """Write the FUSS class allow list into ``<participant>/local/resources.json`` (keeping what the kit's
    ``resources.json`` or ``resources.json.default`` already configures), the default disclosure policy into
    ``local/fuss_policy.json`` unless the participant has one (``fuss_components.disclosure``: the site edits its
    bounds there; with ``byoc=False`` it owns ``SITE_OWNED_KEYS``), with ``byoc=False`` the no-custom-code
    authorization policy into ``local/authorization.json`` and no streaming of the site's logs to the server, and
    with ``gpus`` = (count, GiB) > 0 FLARE's GPU resource manager and consumer for them (replacing the kit's).
    Returns the files written."""
    from fuss_components.disclosure import POLICY_FILE, SITE_OWNED_KEYS, DisclosurePolicy

    local = Path(participant) / "local"
    local.mkdir(parents=True, exist_ok=True)
    target = local / "resources.json"
    source = target if target.is_file() else local / "resources.json.default"
    resources = json.loads(source.read_text()) if source.is_file() else {}
    resources["class_allow_list"] = list(CLASS_ALLOW_LIST)
    resources["class_list_enforcement_mode"] = "enforce"  # "warn" would build unlisted classes anyway
    if not byoc:
        resources["allow_log_streaming"] = False  # site logs (tracebacks, paths) stay on the site
    if gpus and gpus[0] > 0:
        kept = [c for c in resources.get("components", []) if c.get("id") not in ("resource_manager",
                                                                                  "resource_consumer")]
        resources["components"] = gpu_components(*gpus) + kept
    target.write_text(json.dumps(resources, indent=2) + "\n")
    written = [target]
    disclosure = local / POLICY_FILE
    if not disclosure.is_file():  # the site's own bounds are never overwritten
        # a hospital's data, partition, cache and weights are its own, never a job's
        policy = DisclosurePolicy() if byoc else DisclosurePolicy(site_owned=SITE_OWNED_KEYS)
        disclosure.write_text(json.dumps(policy.to_dict(), indent=2) + "\n")
        written.append(disclosure)
    if not byoc:
        policy = local / "authorization.json"
        policy.write_text(json.dumps(HOSPITAL_AUTHORIZATION, indent=2) + "\n")
        written.append(policy)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fuss_flare.site_policy", description=__doc__.split("\n\n")[0])
    parser.add_argument("participants", nargs="+", help="startup kit or simulator workspace folders")
    parser.add_argument("--no-byoc", action="store_true", help="also forbid custom code to every role")
    parser.add_argument("--gpus", type=int, default=None,
                        help="GPUs FLARE may hand to jobs (default: the GPUs of this machine; 0: leave the kit's)")
    parser.add_argument("--gpu-memory", type=float, default=None, help="GiB of each GPU (default: measured)")
    args = parser.parse_args(argv)
    count, memory = host_gpus()
    gpus = (count if args.gpus is None else args.gpus, memory if args.gpu_memory is None else args.gpu_memory)
    if gpus[0] > 0 and not gpus[1] > 0:
        parser.error("--gpus needs --gpu-memory on a machine whose GPUs cannot be measured")
    for folder in args.participants:
        for path in install(folder, byoc=not args.no_byoc, gpus=gpus):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
