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
``fuss_flare/filters.py`` of its own is refused by the site before any of its code is imported.

    python -m fuss_flare.site_policy simulator_workspace          # the simulator's workspace (its local/)
    python -m fuss_flare.site_policy <kit> --no-byoc              # a provisioned site's startup kit
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


def install(participant: str | Path, byoc: bool = True) -> list[Path]:
    """Write the FUSS class allow list into ``<participant>/local/resources.json`` (keeping what the kit's
    ``resources.json`` or ``resources.json.default`` already configures), the default disclosure policy into
    ``local/fuss_policy.json`` unless the participant has one (``fuss_components.disclosure``: the site edits its
    bounds there), and with ``byoc=False`` the no-custom-code authorization policy into
    ``local/authorization.json`` and no streaming of the site's logs to the server. Returns the files written."""
    from fuss_components.disclosure import POLICY_FILE, DisclosurePolicy

    local = Path(participant) / "local"
    local.mkdir(parents=True, exist_ok=True)
    target = local / "resources.json"
    source = target if target.is_file() else local / "resources.json.default"
    resources = json.loads(source.read_text()) if source.is_file() else {}
    resources["class_allow_list"] = list(CLASS_ALLOW_LIST)
    resources["class_list_enforcement_mode"] = "enforce"  # "warn" would build unlisted classes anyway
    if not byoc:
        resources["allow_log_streaming"] = False  # site logs (tracebacks, paths) stay on the site
    target.write_text(json.dumps(resources, indent=2) + "\n")
    written = [target]
    disclosure = local / POLICY_FILE
    if not disclosure.is_file():  # the site's own bounds are never overwritten
        disclosure.write_text(json.dumps(DisclosurePolicy().to_dict(), indent=2) + "\n")
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
    args = parser.parse_args(argv)
    for folder in args.participants:
        for path in install(folder, byoc=not args.no_byoc):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
