"""Token ids of RAFT examples kept on disk, so that a later run skips tokenizing them.

A run re-reads the same data many times over: the next run of a sweep, the run resumed after a
preemption, the eval split of every run. Tokenizing an example costs about 1 ms of CPU per 1k
tokens, on the cores the step needs (data/prefetch.py); a hit here costs a hash and a copy.

What is kept is exactly `tokenize_pair`'s result, the ids of an example's prompt and of its
answer before EOS, truncation or the overlong policy, so one entry serves every max_seq_len and
policy. Entries live in `<root>/<tokenizer fingerprint>/<data file>/` (root: `tokens_root`):

- the fingerprint hashes the tokenizer's whole definition (its `tokenizers` JSON: vocabulary,
  merges, normalizer, pre-tokenizer, the post-processor that adds BOS) with its special tokens
  and the versions of transformers and tokenizers; a tokenizer without that JSON (a slow,
  Python one) is not cached;
- an entry's key is a hash of the prompt and answer *text*, so an edited record and a
  changed prompt format miss instead of reading stale ids (a record moved to another line of
  its file still hits);
- the folder per data file limits what a stream holds to the file it is reading.

A wrong cache must never train silently: the first hit of each stream is tokenized again and
compared, and on a difference the cache is left alone for the rest of the run with a warning.
Files are written whole under a temporary name and renamed (a kill leaves no torn file), one
new file per writer (ranks and runs never write the same file), as .npz arrays loaded with
`allow_pickle=False` (a cache folder shared on a cluster cannot run code). A file that does
not read back is skipped with a warning. Errors of the cache never stop a run: it is a memo.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import uuid
from array import array
from pathlib import Path
from typing import Any

from raft_dist.bundled import cache_root
from raft_dist.data.tokenize import tokenize_pair

log = logging.getLogger(__name__)

FORMAT = 1  # bump when what an entry holds changes
KEY_BYTES = 16
# New entries written out at most this many at a time (a killed run loses at most these).
FLUSH_EVERY = 4096
# Entries of one data file held in memory at most, in tokens (4 bytes each).
MAX_TOKENS = 64 * 2**20
ROOT_VARIABLE = "RAFT_DIST_TOKEN_CACHE"


def tokens_root() -> Path:
    """$RAFT_DIST_TOKEN_CACHE, else $RAFT_DIST_CACHE/tokens, else ~/.cache/raft-dist/tokens."""
    chosen = os.environ.get(ROOT_VARIABLE)
    return Path(chosen) if chosen else cache_root() / "tokens"


def tokenizer_fingerprint(tokenizer: Any) -> str | None:
    """A hash of everything that decides the tokenizer's ids; None when it cannot be had."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    import tokenizers
    import transformers

    digest = hashlib.sha256()
    for part in (
        f"format {FORMAT}",
        type(tokenizer).__name__,
        transformers.__version__,
        tokenizers.__version__,
        backend.to_str(),
        repr(sorted((str(k), str(v)) for k, v in tokenizer.special_tokens_map.items())),
    ):
        digest.update(part.encode("utf-8"))
        digest.update(b"\0")
    return digest.hexdigest()[:32]


def pair_key(prompt: str, completion: str) -> bytes:
    prompt_bytes = prompt.encode("utf-8")
    digest = hashlib.blake2b(digest_size=KEY_BYTES)
    digest.update(len(prompt_bytes).to_bytes(8, "little"))  # no two splits share a key
    digest.update(prompt_bytes)
    digest.update(completion.encode("utf-8"))
    return digest.digest()


def _file_folder(path: Path) -> str:
    return hashlib.sha256(str(Path(path).resolve()).encode("utf-8")).hexdigest()[:24]


class TokenCache:
    """tokenize_pair through the on-disk memo. One per stream: not shared between threads.

    A stream reads its data files one after the other, so only the entries of the file being
    read are held in memory (up to MAX_TOKENS; past that, the file's entries are neither read
    nor written, so a file too large for memory never grows its folder run after run).
    """

    def __init__(self, tokenizer: Any, root: Path, fingerprint: str) -> None:
        self.tokenizer = tokenizer
        self.folder = Path(root) / fingerprint
        self.hits = 0
        self.misses = 0
        self.enabled = True
        self._checked = False  # the first hit is tokenized again and compared
        self._names: dict[Path, str] = {}  # data file -> its folder's name
        self._current: str | None = None  # the folder whose entries are loaded
        self._entries: dict[bytes, tuple[array, int]] = {}  # key -> (prompt+answer ids, split)
        self._tokens = 0
        self._full = False  # the current file's entries did not all fit in memory
        self._new: dict[str, dict[bytes, tuple[array, int]]] = {}
        self._new_count = 0

    @classmethod
    def open(cls, tokenizer: Any, root: Path | None = None) -> TokenCache | None:
        fingerprint = tokenizer_fingerprint(tokenizer)
        if fingerprint is None:
            return None
        return cls(tokenizer, tokens_root() if root is None else root, fingerprint)

    # -- the one call the stream makes ------------------------------------------------------

    def tokenize(self, path: Path, prompt: str, completion: str) -> tuple[list[int], list[int]]:
        if not self.enabled:
            return tokenize_pair(self.tokenizer, prompt, completion)
        name = self._names.get(path)
        if name is None:
            name = self._names[path] = _file_folder(path)
        if name != self._current:
            self._switch(name)
        key = pair_key(prompt, completion)
        found = self._entries.get(key)
        if found is not None:
            ids, split = found
            pair = ids[:split].tolist(), ids[split:].tolist()
            if not self._checked:
                self._checked = True
                fresh = tokenize_pair(self.tokenizer, prompt, completion)
                if fresh != pair:
                    log.warning(
                        "the token cache %s gives other ids than the tokenizer for an example "
                        "of %s; not using it in this run (delete the folder to rebuild it)",
                        self.folder,
                        path,
                    )
                    self.enabled = False
                    return fresh
            self.hits += 1
            return pair
        self.misses += 1
        pair = tokenize_pair(self.tokenizer, prompt, completion)
        if not self._full:
            self._new.setdefault(name, {})[key] = (array("i", pair[0] + pair[1]), len(pair[0]))
            self._new_count += 1
            if self._new_count >= FLUSH_EVERY:
                self.flush()
        return pair

    # -- disk -------------------------------------------------------------------------------

    def _switch(self, name: str) -> None:
        """Hold the entries of the data file `name` names, and no other file's."""
        self._current, self._entries, self._tokens, self._full = name, {}, 0, False
        self._load(self.folder / name)

    def _keep(self, key: bytes, entry: tuple[array, int]) -> bool:
        size = max(1, len(entry[0]))
        if self._tokens + size > MAX_TOKENS:
            self._full = True
            return False
        self._entries[key] = entry
        self._tokens += size
        return True

    def _load(self, folder: Path) -> None:
        if not folder.is_dir():
            return
        import numpy as np

        for file in sorted(folder.glob("*.npz")):
            try:
                with np.load(file, allow_pickle=False) as parts:
                    keys, splits, lengths, ids = (
                        parts[k] for k in ("keys", "splits", "lengths", "ids")
                    )
                ends = np.cumsum(lengths)
                if (
                    keys.ndim != 2
                    or keys.shape[1] != KEY_BYTES
                    or not len(keys) == len(splits) == len(lengths)
                    or (len(ids) != (int(ends[-1]) if len(ends) else 0))
                    or (splits < 0).any()
                    or (splits > lengths).any()
                ):
                    raise ValueError("inconsistent arrays")
            except Exception as exc:  # noqa: BLE001 - a bad file is skipped, never fatal
                log.warning("skipping the unreadable token cache file %s (%s)", file, exc)
                continue
            flat = ids.astype(np.int32, copy=False).tobytes()
            start = 0
            for key, split, end in zip(keys, splits.tolist(), ends.tolist(), strict=True):
                entry = (array("i", flat[start * 4 : end * 4]), split)
                start = end
                if not self._keep(key.tobytes(), entry):
                    return

    def flush(self) -> None:
        """Write the entries made since the last flush, one new file per data file."""
        pending, self._new, self._new_count = self._new, {}, 0
        if not self.enabled or not pending:
            return
        import numpy as np

        for name, entries in pending.items():
            folder = self.folder / name
            keys = np.frombuffer(b"".join(entries), dtype=np.uint8).reshape(-1, KEY_BYTES)
            values = list(entries.values())
            arrays = {
                "keys": keys,
                "splits": np.array([split for _, split in values], dtype=np.int64),
                "lengths": np.array([len(ids) for ids, _ in values], dtype=np.int64),
                "ids": np.frombuffer(b"".join(ids.tobytes() for ids, _ in values), np.int32),
            }
            buffer = io.BytesIO()
            np.savez(buffer, **arrays)
            target = folder / f"{uuid.uuid4().hex}.npz"
            temporary = folder / f".{target.name}.tmp"
            try:
                folder.mkdir(parents=True, exist_ok=True)
                temporary.write_bytes(buffer.getvalue())
                os.replace(temporary, target)
            except OSError as exc:
                log.warning("cannot write the token cache under %s (%s); not caching", folder, exc)
                with contextlib.suppress(OSError):
                    temporary.unlink(missing_ok=True)
                self.enabled = False
                return


def _tokenizer_folders(root: Path) -> list[Path]:
    """The folders this module made under `root` (named by a fingerprint), nothing else."""
    if not root.is_dir():
        return []
    return sorted(
        p
        for p in root.iterdir()
        if p.is_dir() and len(p.name) == 32 and all(c in "0123456789abcdef" for c in p.name)
    )


def cache_usage(root: Path) -> list[tuple[str, int, int]]:
    """(tokenizer fingerprint, entry files, bytes) per tokenizer folder under `root`."""
    usage = []
    for folder in _tokenizer_folders(root):
        files = [f for f in folder.rglob("*") if f.is_file()]
        usage.append((folder.name, len(files), sum(f.stat().st_size for f in files)))
    return usage


def clear_cache(root: Path) -> int:
    """Delete the tokenizer folders under `root` (and only those: a root set by mistake to a
    folder that holds other things keeps them); returns the bytes freed."""
    import shutil

    freed = sum(size for _, _, size in cache_usage(root))
    for folder in _tokenizer_folders(root):
        shutil.rmtree(folder)
    return freed
