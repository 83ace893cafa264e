"""The one reader of data files: every path that reads records or text lines goes through it.

`validate`, the launch preflight, the per-rank streams, `convert` and generation's checks all
read files here, so they apply the same rules and cannot disagree about a file:

* UTF-8 only. A leading UTF-8 byte-order mark is accepted and stripped (Windows tools write
  one); a UTF-16 file is refused with a message saying so instead of failing on every line, and
  so are Parquet and gzip files, with the command that makes JSON Lines of them.
* JSONL: blank lines are not records and are skipped; line numbers stay physical, so an error
  points at the line an editor shows. Text files (data.format=text): every line is a record.
* A line longer than `MAX_LINE_BYTES` is an error for that line (it is never read whole into
  memory), not a crash of the whole file.
* A file with no record is an error for the data set, since it usually means a failed write.
* A file that is one JSON document (an array of records, as Alpaca and many exports ship, or an
  object spread over lines) is refused once, for the file, with the command that rewrites it,
  instead of as a malformed JSON error on every line.
* Every error is a `DataError` naming the file and the line.

`read_records` is the function the issue calls "the reader": a file becomes (line number,
parsed record or the DataError for that line). The other functions are views of it.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raft_dist.data.records import Record, parse_record, to_example
from raft_dist.data.schema import Example
from raft_dist.errors import DataError

UTF8_BOM = b"\xef\xbb\xbf"
UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")
# Files that are not text, by their first bytes: what they are and how to make JSON Lines.
PARQUET_MAGIC = b"PAR1"  # at both ends of the file, so a text starting "PAR1" is still text
BINARY_MAGIC = {
    PARQUET_MAGIC: ("Parquet", "`raft-dist convert {path} --to raft --out DIR` rewrites it"),
    b"\x1f\x8b": ("gzip-compressed", "decompress it first: `gunzip -k {path}`"),
}
# Far above any real record (ten long documents are ~100 KB) and small enough to hold.
MAX_LINE_BYTES = 64 * 2**20
EMPTY_FILE = "the shard is empty (no records)"
JSON_DOCUMENT = (
    "the file is one JSON document (an array of records, or an object over several lines), not "
    "JSON Lines with one record per line; `raft-dist convert {path} --to raft --out FILE.jsonl` "
    "rewrites it"
)


@dataclass(frozen=True)
class Line:
    """One record line: its file, its physical 1-based line number and its bytes (no BOM)."""

    path: Path
    line: int
    raw: bytes
    oversized: bool = False


def iter_lines(
    path: str | Path,
    *,
    text: bool = False,
    start: int = 0,
    stop: int | None = None,
    digest: Any = None,
) -> Iterator[Line]:
    """Record lines number `start` to `stop - 1` (counting records, not physical lines).

    With `digest` (a hashlib object) every byte of the file is fed to it, blank lines too, so
    a caller can check the file against a manifest in the same pass; it then reads to the end.
    """
    path = Path(path)
    try:
        handle = open(path, "rb")
    except OSError as exc:
        raise DataError(path, None, f"cannot read file: {exc.strerror or exc}") from None
    with handle:
        _refuse_binary(path, handle)
        number = index = 0
        while stop is None or index < stop or digest is not None:
            try:
                raw = handle.readline(MAX_LINE_BYTES + 1)
            except OSError as exc:
                raise DataError(path, None, f"cannot read file: {exc.strerror or exc}") from None
            if not raw:
                return
            number += 1
            if digest is not None:
                digest.update(raw)
            oversized = len(raw) > MAX_LINE_BYTES
            if oversized:
                _skip_rest_of_line(handle, digest)
                raw = raw[:MAX_LINE_BYTES]
            if number == 1:
                raw = _strip_bom(path, raw)
            if not text and not raw.strip():
                continue
            if index >= start and (stop is None or index < stop):
                yield Line(path, number, raw, oversized)
            index += 1


def _skip_rest_of_line(handle: Any, digest: Any) -> None:
    while True:
        more = handle.readline(2**20)
        if digest is not None:
            digest.update(more)
        if not more or more.endswith(b"\n"):
            return


def _refuse_binary(path: Path, handle: Any) -> None:
    head = handle.peek(4)[:4]
    for magic, (kind, fix) in BINARY_MAGIC.items():
        if head.startswith(magic) and (magic != PARQUET_MAGIC or _ends_with(handle, magic)):
            fix = fix.format(path=shlex.quote(str(path)))
            raise DataError(path, None, f"the file is {kind}, not JSON Lines; {fix}")


def _ends_with(handle: Any, tail: bytes) -> bool:
    try:
        handle.seek(-len(tail), 2)
        return handle.read(len(tail)) == tail
    except OSError:  # a pipe or a file shorter than the tail
        return False
    finally:
        try:
            handle.seek(0)
        except OSError:
            pass


def _strip_bom(path: Path, raw: bytes) -> bytes:
    if raw.startswith(UTF8_BOM):
        return raw[len(UTF8_BOM) :]
    if raw.startswith(UTF16_BOMS):
        raise DataError(path, 1, "the file is UTF-16 encoded; save it as UTF-8")
    return raw


def count_records(path: str | Path, *, text: bool = False) -> int:
    """Records in a file by the same rules as reading it, without parsing."""
    return sum(1 for _ in iter_lines(path, text=text))


def decode_text(line: Line) -> str:
    if line.oversized:
        raise DataError(line.path, line.line, f"line longer than {MAX_LINE_BYTES} bytes")
    try:
        return line.raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(
            line.path,
            line.line,
            f"invalid UTF-8 byte 0x{line.raw[exc.start]:02x} at byte {exc.start + 1}",
        ) from None


def decode_json(line: Line) -> object:
    value = loads_json(decode_text(line), line.path, line.line)
    if b"\\ud" in line.raw.lower():  # only a \u escape can leave a lone surrogate
        _check_surrogates(value, line)
    return value


def _check_surrogates(value: object, line: Line) -> None:
    """JSON may escape half of a UTF-16 pair ("\\ud800"), which json.loads keeps as a lone
    surrogate: not text, and the tokenizer later fails on it on every rank."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        code = ord(exc.object[exc.start])
        raise DataError(
            line.path, line.line, f"a \\u escape leaves a lone surrogate (U+{code:04X}): not text"
        ) from None


def loads_json(text: str, path: object, line: int | None) -> object:
    """One JSON value; every way `json.loads` can fail becomes a DataError at `path:line`
    (for a whole-file document such as a manifest, `line` None: the line of the syntax error)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        where = line if line is not None else exc.lineno
        raise DataError(path, where, f"malformed JSON: {exc.msg} (column {exc.colno})") from None
    except ValueError:
        # Python refuses to turn a number of more than 4,300 digits into an int (a guard
        # against quadratic-time conversions); json.loads lets that ValueError through.
        raise DataError(path, line, "malformed JSON: a number too long to read") from None
    except RecursionError:
        raise DataError(path, line, "malformed JSON: nested too deeply") from None


def load_json_file(path: str | Path, what: str = "file") -> object:
    """A whole file as one JSON value (a manifest, a `.json` export); every way it can be
    unreadable is a DataError naming it, and a syntax error names its line."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(path, None, f"cannot read the {what}: {exc.strerror or exc}") from None
    raw = _strip_bom(path, raw)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(path, line, f"the {what} is not valid UTF-8") from None
    return loads_json(text, path, None)


def parse_line(line: Line) -> Record:
    return parse_record(decode_json(line), line.path, line.line)


def read_records(
    path: str | Path, *, start: int = 0, stop: int | None = None, digest: Any = None
) -> Iterator[tuple[int, Record | DataError]]:
    """(line number, parsed record | the DataError of that line) for each record.

    A file that cannot be opened, that is UTF-16 or that is one JSON document raises: there is
    no line to blame.
    """
    first = start == 0
    for line in iter_lines(path, start=start, stop=stop, digest=digest):
        try:
            yield line.line, parse_line(line)
        except DataError as exc:
            if first and _opens_json_document(line.raw):
                where = shlex.quote(str(path))
                raise DataError(path, None, JSON_DOCUMENT.format(path=where)) from None
            yield line.line, exc
        first = False


def _opens_json_document(raw: bytes) -> bool:
    """Whether a file's first record line, which did not parse as a record, is where a whole-file
    JSON document starts: an array (`[` alone, or a one-line array) or a lone `{`."""
    head = raw.strip()
    return head.startswith(b"[") or head == b"{"


def iter_jsonl(path: str | Path, start_line: int = 0) -> Iterator[tuple[int, object]]:
    """(physical line number, JSON value) for each record line after physical `start_line`;
    for readers of other shapes (chat) that parse the value themselves."""
    for line in iter_lines(path):
        if line.line > start_line:
            yield line.line, decode_json(line)


def iter_records(
    path: str | Path, *, skip_invalid: bool = False, counter: dict | None = None
) -> Iterator[tuple[int, Record]]:
    """Parsed records; with `skip_invalid`, bad lines are counted rather than fatal, but an
    unreadable file still raises since skipping it would silently train on nothing."""
    counter = counter if counter is not None else {}
    counter.setdefault("skipped", 0)
    for line, result in read_records(path):
        if isinstance(result, DataError):
            if not skip_invalid:
                raise result
            counter["skipped"] += 1
            if counter.get("first_error") is None:
                counter["first_error"] = str(result)
            continue
        yield line, result


def iter_examples(
    path: str | Path, *, skip_invalid: bool = False, counter: dict | None = None
) -> Iterator[tuple[int, Example]]:
    """Training examples from any supported format, with the same skipping rules as
    `iter_records`."""
    for line, record in iter_records(path, skip_invalid=skip_invalid, counter=counter):
        yield line, to_example(record)
