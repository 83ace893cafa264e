"""DeepSpeed's compiled ops (train/ops.py): the folder torch builds them in, the first-build
message, and a lock left by a killed build, which torch would wait on forever."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
from helpers import free_port, offline_env, run_cli, write_dataset, write_recipe

from raft_dist.config import load_recipe
from raft_dist.errors import ConfigError
from raft_dist.train import ops

ROOT = Path(__file__).resolve().parent.parent
OP = "deepspeed_shm_comm"


def built_op(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / f"{folder.name}.so").write_bytes(b"\x7fELF")
    return folder


def age(folder: Path, seconds: float) -> None:
    then = time.time() - seconds
    for path in [*folder.iterdir(), folder]:
        os.utime(path, (then, then))


def test_op_folder_follows_torch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from torch.utils.cpp_extension import _get_build_directory

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    assert ops.op_folder(OP) == Path(_get_build_directory(OP, verbose=False))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    assert (
        ops.op_folder(OP) == Path(_get_build_directory(OP, verbose=False)) == tmp_path / "ext" / OP
    )


@pytest.mark.parametrize("built", [True, False])
def test_first_build_is_announced_only_when_the_op_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, built: bool
) -> None:
    cache = tmp_path / "ext"
    if built:
        built_op(cache / OP)
    recipe = load_recipe(ROOT / "configs" / "tiny.yaml", [f"training.ops_cache_dir={cache}"])
    # set first, so that the value prepare_op_builds writes is undone after the test
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "elsewhere"))
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    ops.prepare_op_builds(recipe, [OP], is_main=True)
    assert os.environ["TORCH_EXTENSIONS_DIR"] == str(cache)  # the recipe's cache is torch's
    said = capsys.readouterr().out
    assert (f"DeepSpeed compiles {OP} on first use" in said) is not built
    if not built:
        assert str(cache) in said


def test_a_stale_lock_is_removed_with_a_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    folder = built_op(tmp_path / OP)
    (folder / "lock").touch()
    age(folder, ops.STALE_AFTER_S + 60)
    ops.wait_for_live_build(folder, is_main=True, poll_s=0.01)
    assert not (folder / "lock").exists()
    assert (folder / f"{OP}.so").exists()
    warning = capsys.readouterr().err
    assert f"{folder / 'lock'}: removed a lock that nothing has touched for 11 min" in warning


@pytest.mark.parametrize("value", ["soon", "0", "-5", "nan"])
def test_a_bad_stale_limit_names_the_variable(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv(ops.STALE_VARIABLE, value)
    with pytest.raises(ConfigError, match=rf"{ops.STALE_VARIABLE}='{value}': expected a number"):
        ops.stale_limit()
    monkeypatch.setenv(ops.STALE_VARIABLE, "2.5")
    assert ops.stale_limit() == 2.5


def test_a_live_build_is_waited_for_not_broken(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """The build outlasts the stale limit but writes more often than it: a lock's age alone
    would break it."""
    folder = tmp_path / OP
    folder.mkdir()
    (folder / "lock").touch()
    problems: list[BaseException] = []

    def build() -> None:  # writes as it goes, then releases its lock
        try:
            for step in range(8):
                time.sleep(0.3)
                (folder / f"step{step}.o").touch()
            (folder / "lock").unlink()
        except BaseException as exc:  # the lock was taken away from a live build
            problems.append(exc)

    builder = threading.Thread(target=build)
    started = time.monotonic()
    builder.start()
    ops.wait_for_live_build(folder, is_main=True, stale_after_s=1.5, poll_s=0.01)
    waited = time.monotonic() - started
    builder.join()
    assert not problems
    assert waited >= 2.4  # until the build released its lock
    said = capsys.readouterr().err
    assert f"waiting for a build of {OP} in progress" in said and "removed" not in said


@pytest.mark.distributed
def test_a_deepspeed_run_is_not_held_by_a_killed_build(tmp_path: Path) -> None:
    """A real DeepSpeed start on CPU loads deepspeed_shm_comm through torch's cpp_extension.
    With a lock file in the op's folder torch waits for ever, even when the op is built; the
    run removes the lock and trains (the wait for a live build is tested above). The lock is planted
    in the session's shared op cache, where the op is already built (a copy elsewhere would be
    compiled again), with a short stale limit."""
    env = offline_env(**{ops.STALE_VARIABLE: "4"})
    lock = Path(env["TORCH_EXTENSIONS_DIR"]) / OP / "lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    write_dataset(tmp_path / "data", [4])
    recipe = write_recipe(
        tmp_path / "r.yaml",
        tmp_path / "data",
        tmp_path / "run",
        training={"max_steps": 1, "micro_batch_size": 1, "gradient_accumulation_steps": 1},
        output={"save_final_model": False},
    )
    lock.touch()
    try:
        result = run_cli(
            "launch",
            "--profile",
            "deepspeed_zero2",
            "--config",
            str(recipe),
            "--num_processes",
            "1",
            "--main_process_port",
            str(free_port()),
            env=env,
            timeout=420,  # the op compiles here if the session has not built it yet
        )
    finally:
        lock.unlink(missing_ok=True)  # never leave the shared cache locked
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"{lock}: removed a lock" in result.stderr
    assert any(lock.parent.glob("*.so"))
