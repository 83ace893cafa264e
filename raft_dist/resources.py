"""Find the files that ship beside the package: launch profiles, recipes, the entry script.

From a checkout they are at the repository root; from a wheel they are installed as data files
under <prefix>/share/raft-dist. Both layouts are searched, checkout first.
"""

from __future__ import annotations

import sys
from pathlib import Path

from raft_dist.errors import ConfigError

CHECKOUT_ROOT = Path(__file__).resolve().parent.parent
SHARE_ROOT = Path(sys.prefix) / "share" / "raft-dist"


def resource_dir(name: str) -> Path:
    for root in (CHECKOUT_ROOT, SHARE_ROOT):
        candidate = root / name
        if candidate.is_dir():
            return candidate
    raise ConfigError(
        f"cannot find the {name}/ folder of raft-dist (looked in {CHECKOUT_ROOT} "
        f"and {SHARE_ROOT}); reinstall raft-dist"
    )


def entry_script() -> Path:
    return resource_dir("launch") / "train.py"


def profile_names() -> list[str]:
    return sorted(p.stem for p in resource_dir("accelerate_configs").glob("*.yaml"))


def resolve_profile(profile: str) -> Path:
    """A profile is a shipped name (cpu, multi_gpu, ...) or a path to any accelerate config."""
    path = Path(profile)
    if path.suffix in (".yaml", ".yml", ".json") or path.is_file():
        if not path.is_file():
            raise ConfigError(f"--profile: no such accelerate config file {profile}")
        return path
    candidate = resource_dir("accelerate_configs") / f"{profile}.yaml"
    if not candidate.is_file():
        raise ConfigError(
            f"--profile: unknown profile {profile!r}; allowed: "
            f"{', '.join(profile_names())} or a path to an accelerate config file"
        )
    return candidate
