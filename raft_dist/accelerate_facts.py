"""What Accelerate itself says about `accelerate launch` options and about a profile, asked once
per Accelerate install and kept on disk.

Asking means importing Accelerate, which imports torch: about 3 s on a 2-core machine, paid by
`raft-dist launch` before its `accelerate launch` child imports both again. The answers depend
only on the installed Accelerate (its option table; its loader's verdict on a profile's bytes),
so they are kept under the user cache ($RAFT_DIST_ACCELERATE_CACHE, else
$RAFT_DIST_CACHE/accelerate, else ~/.cache/raft-dist/accelerate), in a folder named after
Accelerate's version and the files that give the answers (an upgrade or an edited install starts
a new folder). Only accepted profiles are kept: a refused one asks Accelerate again, so its error
stays Accelerate's own. A cache that cannot be read or written is skipped, never an error.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
from pathlib import Path
from typing import Any

from raft_dist.atomic import write_atomic
from raft_dist.bundled import cache_root

FORMAT = 1  # bump when what an entry holds changes
ROOT_VARIABLE = "RAFT_DIST_ACCELERATE_CACHE"
# The profile settings the launcher reads; everything else in a profile is accelerate's alone.
PROFILE_FIELDS = (
    "distributed_type",
    "use_cpu",
    "num_processes",
    "num_machines",
    "machine_rank",
    "deepspeed_config",
)
# The Accelerate files whose content decides the answers (besides its version).
SOURCES = ("commands/launch.py", "commands/config/config_args.py", "utils/dataclasses.py")


def launch_options() -> dict[str, bool]:
    """Every `accelerate launch` option -> whether it takes a value (each takes one or none),
    from accelerate's own parser, so a new accelerate option is known without a change here."""
    folder = _folder()
    kept = _read(folder / "launch_options.json") if folder else None
    if kept is not None:
        return kept
    from accelerate.commands.launch import launch_command_parser

    parser = launch_command_parser()
    # argparse lists its options only in `_actions`.
    options = {
        name: action.nargs != 0 for action in parser._actions for name in action.option_strings
    }
    if folder:
        _write(folder / "launch_options.json", options)
    return options


def profile_settings(path: Path) -> dict[str, Any]:
    """The launcher's settings (PROFILE_FIELDS) of a profile Accelerate's loader accepts, with
    `distributed_type` as its plain value. Raises whatever the loader raises for a refused one."""
    content = path.read_bytes()
    folder = _folder()
    # Accelerate reads a file named *.json as JSON and any other as YAML: the same bytes can
    # be one config or a refused one.
    key = hashlib.sha256(b"json " if str(path).endswith(".json") else b"yaml ")
    key.update(content)
    entry = folder / f"profile-{key.hexdigest()[:32]}.json" if folder else None
    kept = _read(entry) if entry else None
    if kept is not None:
        return kept
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(path))
    settings = {name: getattr(cfg, name, None) for name in PROFILE_FIELDS}
    kind = settings["distributed_type"]
    settings["distributed_type"] = str(getattr(kind, "value", kind))
    if entry and path.read_bytes() == content:  # not changed while the loader read it
        _write(entry, settings)
    return settings


def _folder() -> Path | None:
    """This Accelerate install's cache folder, or None when Accelerate's files cannot be found
    (then nothing is kept and every call asks Accelerate)."""
    try:
        spec = importlib.util.find_spec("accelerate")  # finds the package without importing it
        version = importlib.metadata.version("accelerate")
    except (ImportError, ValueError, importlib.metadata.PackageNotFoundError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(list(spec.submodule_search_locations)[0])
    digest = hashlib.sha256(f"{FORMAT} {version} {root}".encode())
    for name in SOURCES:
        try:
            stat = (root / name).stat()
        except OSError:
            return None
        digest.update(f" {name} {stat.st_size} {stat.st_mtime_ns}".encode())
    chosen = os.environ.get(ROOT_VARIABLE)
    base = Path(chosen) if chosen else cache_root() / "accelerate"
    return base / f"{version}-{digest.hexdigest()[:16]}"


def _read(path: Path) -> Any:
    """An entry's value, or None when it is missing or damaged (its digest does not match)."""
    try:
        entry = json.loads(path.read_text(encoding="utf-8"))
        value = entry["value"]
        return value if entry["digest"] == _digest(value) else None
    except (OSError, ValueError, TypeError, KeyError):
        return None


def _write(path: Path, value: Any) -> None:
    try:
        entry = json.dumps({"digest": _digest(value), "value": value}, allow_nan=False)
    except (TypeError, ValueError):
        return  # e.g. a date in deepspeed_config: correct, just not kept
    if json.loads(entry)["value"] != value:
        return  # JSON would change it (a number as a mapping key): not kept
    # Two launches may write the same entry at once, with the same bytes; should one still
    # swap in a torn file, its digest fails and the next launch asks again.
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, entry.encode("utf-8"))
    except OSError:
        return


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()
