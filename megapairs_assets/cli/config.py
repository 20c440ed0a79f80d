"""`megapairs config [RESOURCE ...]`: the profile's resource settings as Dagster run config.

Dagster replaces a resource's whole configuration with the run config given for it: a field
left out takes the class default, not the profile's value (a launchpad run that sets only a
generation backend would also drop the demo's model budget and the dataset licence). This
prints the profile's current values in run-config form, to copy into the launchpad or a
`-c` file and edit there, so an override changes only what it names.
"""

from __future__ import annotations

import argparse
import sys

import yaml


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    config = subparsers.add_parser(
        "config",
        help="print the profile's resource settings as Dagster run config (to edit and pass)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    config.add_argument(
        "resources", nargs="*", metavar="RESOURCE", help="resource names (default: all of them)"
    )
    config.set_defaults(func=cmd_config)
    return config


def resource_run_config(resources: dict, names: list[str]) -> dict:
    """{"resources": {name: {"config": fields}}} for `names`, with the profile's values."""
    from megapairs_assets.lib.errors import ConfigurationError

    unknown = sorted(set(names) - set(resources))
    if unknown:
        raise ConfigurationError(
            f"no resource named {', '.join(unknown)}; resources: {', '.join(sorted(resources))}"
        )
    return {
        "resources": {
            name: {"config": resources[name].model_dump(mode="json")}
            for name in names or sorted(resources)
        }
    }


def cmd_config(args: argparse.Namespace) -> int:
    from megapairs_assets.lib.storage import default_home
    from resources.environment import profile_from_env
    from resources.profiles import build_resources

    resources = build_resources(profile_from_env(), default_home())
    yaml.safe_dump(resource_run_config(resources, args.resources), sys.stdout, sort_keys=False)
    return 0
