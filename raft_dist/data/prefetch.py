"""Batches made ahead of the training step: one thread reads, tokenizes and collates the next
few batches of a RankStream while the step runs.

What the loop relies on holds exactly as without prefetching:

* the same batches in the same order, epoch boundaries included: the thread makes them with
  the stream's own `next_batch`, one call per batch, and nothing else touches the stream;
* `state_dict()` is the stream's position after the last batch the loop *took*, not after the
  last one the thread made: every batch travels with the position the stream had right after
  making it, and taking the batch adopts that position. A checkpoint therefore resumes at the
  first batch the loop never saw, however far ahead the thread was;
* record ids reach the audit list (`RankStream.seen_ids`, flushed at checkpoints) only for
  batches the loop took, so the audit and a resume still see every record exactly once;
* an error raised while making a batch (a DataError for a malformed record) is raised by
  `next_batch` when the loop asks for that batch, the same exception with the same message.

Thread budget: one thread per rank. torch's intra-op pool already has a thread per core, so the
prefetch thread competes with it; it is busy for the tokenizer calls and the collation of the
next batch (5-7 % of a step of the tiny model on 2 cores) and then sleeps in `put` until the
loop takes a batch. The tokenizer's encode runs in Rust without the GIL, on this thread: one
text at a time never reaches the tokenizers library's thread pool (the same CPU time per
example, 1.1 ms on the demo data, with TOKENIZERS_PARALLELISM unset or false). The queue is
short on purpose: one or two ready batches already hide the data path, while a deeper one
only holds more memory and makes the thread run in longer bursts that take a core from
torch's threads (on 2 cores an OpenMP region waits for its slowest thread).
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Any

from raft_dist.data.batching import Batch
from raft_dist.evaluate import predicting_positions, target_count

DEFAULT_DEPTH = 2
_POLL_S = 0.2  # how often a blocked put/get looks at whether the other side went away


@dataclass
class Fed:
    """A batch as the loop takes it, with the token counts the step needs, counted on the CPU
    copy: reading them from the device copy would wait for the device once per micro-batch."""

    batch: Batch
    target_tokens: float
    input_tokens: float
    loss_positions: Any  # token_loss_sum's `positions`: where the loss needs logits
    pinned: bool = False

    def to(self, device: Any) -> Batch:
        # From pinned memory the copy to a GPU is asynchronous; from pageable memory torch
        # waits for the copy, and with it for every kernel queued before it.
        return {k: v.to(device, non_blocking=self.pinned) for k, v in self.batch.items()}

    def positions_to(self, device: Any) -> Any:
        return self.loss_positions.to(device, non_blocking=self.pinned)


@dataclass
class _Item:
    """What the thread hands over, in stream order."""

    kind: str  # "batch" (batch None: this rank's range ended), "epoch" or "error"
    fed: Fed | None = None
    state: dict[str, Any] | None = None  # the stream's state_dict() right after this item
    ids: list[str] | None = None  # record ids read while making this batch
    epoch: int = 0
    error: Exception | None = None


def counted(batch: Batch, pin_memory: bool = False) -> Fed:
    fed = Fed(
        batch,
        target_count(batch),
        float(batch["attention_mask"].sum()),
        predicting_positions(batch["labels"]),
    )
    if pin_memory:
        fed.batch = {k: v.pin_memory() for k, v in batch.items()}
        fed.loss_positions = fed.loss_positions.pin_memory()
        fed.pinned = True
    return fed


class Prefetcher:
    """`next_batch` / `start_epoch` / `state_dict` over a RankStream, with `depth` batches made
    ahead in a thread (depth 0: made on the call, in the caller's thread). `close()` stops the
    thread and puts the stream back at the position of the last batch taken."""

    def __init__(self, stream: Any, depth: int = DEFAULT_DEPTH, *, pin_memory: bool = False):
        self.stream = stream
        self.depth = depth
        self.pin_memory = pin_memory
        self.audit: list[str] | None = stream.seen_ids  # the loop's list
        self._state = stream.state_dict()  # position after the last batch taken
        self._ended = False  # the stream said None: this rank's range is done for the epoch
        self._failed: Exception | None = None
        self._queue: queue.Queue[_Item] = queue.Queue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if depth > 0:
            self._start()

    # -- the loop's side -----------------------------------------------------------------

    @property
    def epoch(self) -> int:
        return self._state["epoch"] if self._thread is not None else self.stream.state.epoch

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint saves: the position after the last batch taken."""
        return self._state if self._thread is not None else self.stream.state_dict()

    def next_batch(self) -> Fed | None:
        if self._thread is None:
            batch = self.stream.next_batch()
            return counted(batch, self.pin_memory) if batch is not None else None
        if self._ended:  # stays None until start_epoch, as the stream's own next_batch does
            return None
        item = self._take()
        self._state = item.state
        if self.audit is not None and item.ids:
            self.audit.extend(item.ids)
        if item.fed is None:
            self._ended = True
        return item.fed

    def start_epoch(self, epoch: int) -> None:
        if self._thread is None:
            self.stream.start_epoch(epoch)
            return
        ended, self._ended = self._ended, False
        if ended:
            # After the end of its range the thread starts the next epoch by itself (what the
            # loop does next), so the new epoch's first batches are ready too.
            item = self._take()
            if item.kind == "epoch" and item.epoch == epoch:
                self._state = item.state
                return
        # Anything else (not seen here): rewind the stream to what was taken and start over.
        self._halt()
        self.stream.load_state_dict(self._state)
        self.stream.start_epoch(epoch)
        self._state = self.stream.state_dict()
        self._start()

    def close(self) -> None:
        """Stop the thread; the stream is left exactly where the loop is (position, length
        statistics, skipped count), as if it had never read ahead."""
        if self._thread is None:
            return
        self._halt()
        self._thread = None
        self.stream.load_state_dict(self._state)
        self.stream.seen_ids = self.audit

    def _take(self) -> _Item:
        if self._failed is not None:
            raise self._failed
        while True:
            try:
                item = self._queue.get(timeout=_POLL_S)
                break
            except queue.Empty:
                if self._thread is not None and not self._thread.is_alive() and self._queue.empty():
                    raise RuntimeError("the batch prefetch thread ended without a batch") from None
        if item.kind == "error":
            assert item.error is not None
            self._failed = item.error
            raise item.error
        return item

    # -- the thread's side ---------------------------------------------------------------

    def _start(self) -> None:
        self._stop = threading.Event()
        self._queue = queue.Queue(maxsize=self.depth)
        self._thread = threading.Thread(
            target=self._produce, args=(self._stop, self._queue), name="batch-prefetch"
        )
        # A daemon: an interpreter that exits without close() must not wait for it.
        self._thread.daemon = True
        self._thread.start()

    def _halt(self) -> None:
        """Stop the thread; empty the queue so that a put() it is blocked in returns."""
        thread = self._thread
        self._stop.set()
        while thread is not None and thread.is_alive():
            self._drain()
            thread.join(timeout=_POLL_S / 4)
        self._drain()

    def _drain(self) -> None:
        try:
            while True:
                self._queue.get_nowait()
        except queue.Empty:
            pass

    def _produce(self, stop: threading.Event, out: queue.Queue) -> None:
        stream = self.stream
        try:
            while not stop.is_set():
                # The ids of this batch only: the loop adds them to its audit list when (and
                # if) it takes the batch.
                ids: list[str] | None = [] if self.audit is not None else None
                stream.seen_ids = ids
                batch = stream.next_batch()
                fed = counted(batch, self.pin_memory) if batch is not None else None
                if not _put(out, _Item("batch", fed, stream.state_dict(), ids), stop):
                    return
                if batch is None:
                    epoch = stream.state.epoch + 1
                    stream.start_epoch(epoch)
                    if not _put(out, _Item("epoch", state=stream.state_dict(), epoch=epoch), stop):
                        return
        except Exception as exc:  # handed to the loop, raised there when it gets this far
            _put(out, _Item("error", error=exc), stop)


def _put(out: queue.Queue, item: _Item, stop: threading.Event) -> bool:
    """Block until the loop makes room; False once the loop closed the prefetcher."""
    while not stop.is_set():
        try:
            out.put(item, timeout=_POLL_S)
            return True
        except queue.Full:
            continue
    return False


def prefetch_depth(configured: int | None) -> int:
    return DEFAULT_DEPTH if configured is None else configured
