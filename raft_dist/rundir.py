"""The run folder (`output.dir`): every path a run writes, named once.

    output.dir/
      run.lock                    held by the running run's rank 0 (train/lock.py)
      recipe.yaml                 the resolved recipe of the latest start
      data-check.json             the data stamp: what was checked before the run (data/check.py)
      metrics.jsonl               one JSON line per logged step and evaluation
      events.out.tfevents.*       TensorBoard (under raft-dist/), when logging.tensorboard
      summary.json                written at the end of every run, full or stopped early
      stopped.json                the stop marker: this run stopped early and can resume
      stop-request                written by the sbatch templates' time-limit trap; rank 0 stops
      ranks/rankN.json            what rank N really was (world size, engine, device, ...)
      ranks/rankN_peak.json       rank N's peak resident memory
      ranks/shared-check          rank 0's nonce: every rank reads it back (shared filesystem?)
      audit/seen_ids_rankN.txt    record ids rank N trained on (data.record_audit)
      checkpoints/step-XXXXXXXX/  complete checkpoints (train/checkpoint.py says what is inside);
      checkpoints/.step-*.tmp/    a checkpoint being written, never read
      checkpoints/damaged-step-*/ a checkpoint found damaged on resume, kept for inspection
      final/                      the trained model (or PEFT adapter) and tokenizer; full runs only

The launcher writes data-check.json before any rank starts; everything else is written by the
ranks, rank 0 unless the name says otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunDir:
    root: Path

    @property
    def lock(self) -> Path:
        return self.root / "run.lock"

    @property
    def recipe(self) -> Path:
        return self.root / "recipe.yaml"

    @property
    def data_stamp(self) -> Path:
        return self.root / "data-check.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def stopped(self) -> Path:
        return self.root / "stopped.json"

    @property
    def stop_request(self) -> Path:
        return self.root / "stop-request"

    @property
    def ranks(self) -> Path:
        return self.root / "ranks"

    def rank_facts(self, rank: int) -> Path:
        return self.ranks / f"rank{rank}.json"

    @property
    def nonce(self) -> Path:
        return self.ranks / "shared-check"

    def rank_peak(self, rank: int) -> Path:
        return self.ranks / f"rank{rank}_peak.json"

    def audit(self, rank: int) -> Path:
        return self.root / "audit" / f"seen_ids_rank{rank}.txt"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def final(self) -> Path:
        return self.root / "final"
