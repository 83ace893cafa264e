"""The launch contract: what `raft-dist launch` promised, checked by every rank at start.

The launcher reads the profile, writes what the ranks must find into the environment, and each
rank compares that with what it really is (world size, engine, ZeRO stage, device kind). A
launch that silently became something else (one process instead of two, DeepSpeed dropped by a
CPU flag, a GPU profile on a machine whose GPUs are not usable) stops before the model loads.

This module is neutral ground: the launcher imports it without importing the training code, and
the ranks import it without importing the launcher.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from raft_dist.errors import ConfigError

EXPECT_WORLD_SIZE = "RAFT_DIST_EXPECT_WORLD_SIZE"
EXPECT_ENGINE = "RAFT_DIST_EXPECT_ENGINE"
EXPECT_ZERO_STAGE = "RAFT_DIST_EXPECT_ZERO_STAGE"
EXPECT_DEVICE = "RAFT_DIST_EXPECT_DEVICE"  # "cuda" or "cpu"; unset: either
PROFILE = "RAFT_DIST_PROFILE"
CONTRACT_VARIABLES = (EXPECT_WORLD_SIZE, EXPECT_ENGINE, EXPECT_ZERO_STAGE, EXPECT_DEVICE, PROFILE)


class Live(Protocol):
    """What a rank really is (raft_dist.train.accelerator.LiveSetup provides it)."""

    world_size: int
    engine: str
    zero_stage: int | None
    device: str


@dataclass(frozen=True)
class Contract:
    world_size: int | None = None
    engine: str | None = None
    zero_stage: int | None = None
    device: str | None = None
    profile: str | None = None

    def to_env(self) -> dict[str, str]:
        values = {
            EXPECT_WORLD_SIZE: self.world_size,
            EXPECT_ENGINE: self.engine,
            EXPECT_ZERO_STAGE: self.zero_stage,
            EXPECT_DEVICE: self.device,
            PROFILE: self.profile,
        }
        return {k: str(v) for k, v in values.items() if v is not None}

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Contract:
        env = os.environ if environ is None else environ
        world, stage = env.get(EXPECT_WORLD_SIZE), env.get(EXPECT_ZERO_STAGE)
        return cls(
            world_size=int(world) if world else None,
            engine=env.get(EXPECT_ENGINE) or None,
            zero_stage=int(stage) if stage and stage != "None" else None,
            device=env.get(EXPECT_DEVICE) or None,
            profile=env.get(PROFILE) or None,
        )

    def violations(self, live: Live) -> list[str]:
        problems = []
        if self.world_size is not None and self.world_size != live.world_size:
            problems.append(
                f"world size {live.world_size}, but the launch asked for {self.world_size}"
            )
        if self.engine is not None and self.engine != live.engine:
            problems.append(f"engine {live.engine}, but the launch asked for {self.engine}")
        if self.zero_stage is not None and self.zero_stage != live.zero_stage:
            problems.append(
                f"ZeRO stage {live.zero_stage}, but the launch asked for {self.zero_stage}"
            )
        kind = live.device_type
        if self.device is not None and self.device != kind:
            problems.append(
                f"device {live.device}, but the profile asks for {self.device} "
                + ("(no usable CUDA GPU on this machine)" if self.device == "cuda" else "")
            )
        return problems

    def check(self, live: Live) -> None:
        """Refuse to train when the launch asked for something the processes did not get."""
        problems = self.violations(live)
        if problems:
            profile = f"--profile {self.profile}: " if self.profile else ""
            raise ConfigError(
                f"{profile}the live setup contradicts the launch: "
                + "; ".join(p.strip() for p in problems)
                + ". Check the accelerate config and the environment (README, 'Never "
                "silently wrong': use_cpu/--cpu with a DeepSpeed profile drops DeepSpeed; a "
                "MULTI_CPU profile without mpirun runs one process; a GPU profile needs CUDA "
                "GPUs, use --profile cpu on a machine without them)."
            )
