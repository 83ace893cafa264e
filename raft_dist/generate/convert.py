"""`raft-dist convert`: RAFT data between raft-dist's native JSONL and other common formats.

Formats (`--to`) and what each can hold of a native record:

* ``raft``: native JSONL, everything (``meta`` included). Folder output gets a manifest.
* ``raft_paper``: the RAFT paper's JSONL (``context {title:[[...]], sentences:[[...]]}``,
  ``oracle_context``, ``cot_answer``, ``instruction``, ``type``): everything but ``meta``. Empty
  titles become the paper's "placeholder_title", which reads back as no title.
* ``instruction`` (instruction/output), ``prompt_completion``, ``chat`` (one user and one
  assistant message): the rendered prompt and the answer only, so documents, oracle and question
  are no longer separate and the records come back as prompt/completion examples; ``meta`` is
  dropped. instruction/output reads back as ``instruction + "\\n"``, so a prompt that does not
  end in a newline (every RAFT prompt ends in "Answer: ") comes back with one.
* ``parquet`` and ``datasets`` (``DatasetDict.save_to_disk``): native columns, everything;
  ``meta`` is stored as a JSON string.

Inputs: data set folders (manifest + splits), folders or files of JSONL in any format
`raft_dist.data.records` reads (chat included), `.json` files (an array of records, as Alpaca
ships; errors name the item's 1-based position as its line), Parquet files and datasets
folders. Splits are kept: a folder output holds one part per split, a single-file output all
splits in input order.
Output is written to a temporary path and moved into place at the end, so a bad record never
leaves a half-converted output behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from raft_dist.atomic import write_atomic
from raft_dist.data.prompts import render_prompt
from raft_dist.data.reader import decode_json, iter_jsonl, iter_lines, load_json_file
from raft_dist.data.records import (
    PAPER_PLACEHOLDER_TITLE,
    Example,
    RaftRecord,
    parse_record,
    to_example,
    to_json,
)
from raft_dist.data.sources import manifest_shards, read_manifest
from raft_dist.errors import ConfigError, DataError
from raft_dist.generate.writer import FORMAT_VERSION, MANIFEST

FORMATS = ("raft", "raft_paper", "instruction", "prompt_completion", "chat", "parquet", "datasets")
KEEPS_META = ("raft", "parquet", "datasets")
PROMPT_ONLY = ("instruction", "prompt_completion", "chat")
SPLIT_ORDER = {"train": 0, "eval": 1, "test": 2}  # output order of a folder's splits
EVAL_NAMES = frozenset({"eval", "evaluation", "validation", "valid", "val", "dev"})
BATCH = 1000
FILE_SUFFIXES: dict[str, Literal["jsonl", "json", "parquet"]] = {
    ".jsonl": "jsonl",
    ".json": "json",
    ".parquet": "parquet",
}
# A folder's .json files are often not records (dataset_info.json, configs): read them only when
# named one by one.
FOLDER_SUFFIXES = (".jsonl", ".parquet")

Record = RaftRecord | Example


@dataclass(frozen=True)
class Item:
    """One record on its way through, with the split it belongs to and where it came from."""

    record: Record
    split: str
    meta: Any
    path: str
    line: int | None


@dataclass(frozen=True)
class _Input:
    kind: Literal["jsonl", "json", "parquet", "datasets"]
    path: Path
    split: str  # for datasets folders: the split of a single Dataset


@dataclass
class ConvertResult:
    out: Path
    fmt: str
    splits: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        total = sum(self.splits.values())
        parts = ", ".join(f"{split} {n}" for split, n in self.splits.items())
        lines = [f"converted {total} records ({parts}) to {self.fmt}: {self.out}"]
        return "\n".join(lines + [f"note: {note}" for note in self.notes])


# --------------------------------------------------------------------------- finding inputs


def _split_name(name: str) -> str:
    name = name.lower()
    return "eval" if name in EVAL_NAMES else name


def _split_of(relative: Path) -> str:
    """The split a file belongs to, from its folders or its name (train/, eval.parquet,
    validation-00000-of-00001.parquet); train when nothing says otherwise."""
    names = [*reversed(relative.parts[:-1]), relative.stem]
    for name in names:
        token = _split_name(re.split(r"[-_.]", name)[0])
        if token in ("train", "eval", "test"):
            return token
    return "train"


def _is_datasets_folder(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def find_inputs(specs: Sequence[str]) -> list[_Input]:
    """What to read, in order; every problem is a DataError naming the path."""
    if not specs:
        raise ConfigError("no input given: name at least one file or folder")
    found: list[_Input] = []
    for spec in specs:
        path = Path(spec)
        if path.is_dir() and (path / MANIFEST).is_file():
            found += _manifest_inputs(path)
        elif path.is_dir() and _is_datasets_folder(path):
            found.append(_Input("datasets", path, "train"))
        elif path.is_dir():
            files = sorted(
                p
                for p in path.rglob("*")
                if p.is_file()
                and p.suffix in FOLDER_SUFFIXES
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            if not files:
                wanted = " or ".join(FOLDER_SUFFIXES)
                raise DataError(path, None, f"the folder holds no {wanted} file")
            inputs = [_Input(_kind(p), p, _split_of(p.relative_to(path))) for p in files]
            found += sorted(inputs, key=lambda i: SPLIT_ORDER.get(i.split, len(SPLIT_ORDER)))
        elif path.is_file():
            if path.suffix not in FILE_SUFFIXES:
                raise DataError(
                    path,
                    None,
                    f"unsupported file type '{path.suffix}' (use {', '.join(FILE_SUFFIXES)})",
                )
            found.append(_Input(_kind(path), path, _split_of(Path(path.name))))
        else:
            raise DataError(path, None, "no such file or folder")
    return found


def _kind(path: Path) -> Literal["jsonl", "json", "parquet"]:
    return FILE_SUFFIXES[path.suffix]


def _manifest_inputs(root: Path) -> list[_Input]:
    """A data set folder's shards, through the one manifest reader: a manifest naming a file
    outside its folder (`/etc/passwd`, `../x`) is refused there, not read."""
    splits = read_manifest(root / MANIFEST).get("splits")
    if not isinstance(splits, dict):
        raise DataError(root / MANIFEST, None, '"splits" must be an object')
    inputs = []
    for split in splits:
        for shard in manifest_shards(str(root), split) or []:
            if not Path(shard.path).is_file():
                raise DataError(shard.path, None, f"listed in {root / MANIFEST} but missing")
            inputs.append(_Input("jsonl", Path(shard.path), _split_name(split)))
    return inputs


# --------------------------------------------------------------------------- reading records


def _parse(obj: object, path: object, line: int | None) -> tuple[Record, Any]:
    record = parse_record(obj, path, line)
    return record, obj.get("meta") if isinstance(obj, dict) else None


def _clean(row: dict) -> dict:
    """Arrow rows hold every column; a null means "absent", except a RAFT record's oracle_index
    where null means the oracle was left out."""
    keep = {"oracle_index"} if row.get("documents") is not None else set()
    return {k: v for k, v in row.items() if v is not None or k in keep}


def _arrow_meta(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def _rows(source: _Input) -> Iterator[tuple[str, int, dict]]:
    """(split, 1-based row, row) of a Parquet file or a datasets folder."""
    if source.kind == "parquet":
        import pyarrow.parquet as pq

        try:
            batches = pq.ParquetFile(source.path).iter_batches(batch_size=BATCH)
            row = 0
            for batch in batches:
                for value in batch.to_pylist():
                    row += 1
                    yield source.split, row, value
        except (OSError, ValueError) as exc:  # ArrowInvalid is a ValueError
            raise DataError(source.path, None, f"cannot read Parquet: {exc}") from None
        return
    import datasets

    try:
        loaded = datasets.load_from_disk(str(source.path))
    except (OSError, ValueError, FileNotFoundError) as exc:
        raise DataError(source.path, None, f"cannot read datasets folder: {exc}") from None
    parts = loaded.items() if isinstance(loaded, datasets.DatasetDict) else [("train", loaded)]
    for split, dataset in parts:
        row = 0
        for table in dataset.with_format("arrow").iter(batch_size=BATCH):
            for value in table.to_pylist():
                row += 1
                yield _split_name(split), row, value


def _json_items(path: Path) -> Iterator[tuple[int, object]]:
    """(1-based item, value) of a `.json` file: an array of records, one record, or JSON Lines
    under a .json name. The whole file is read at once, as json.load does."""
    try:
        value = load_json_file(path)
    except DataError:
        if not _first_line_is_json(path):
            raise
        yield from iter_jsonl(path)  # JSON Lines: errors name their line
        return
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise DataError(path, None, "a .json file must hold an array of records or one record")
    yield from enumerate(value, start=1)


def _first_line_is_json(path: Path) -> bool:
    for line in iter_lines(path, stop=1):
        try:
            decode_json(line)
        except DataError:
            return False
        return True
    return False


def read_items(sources: Sequence[_Input]) -> Iterator[Item]:
    for source in sources:
        if source.kind in ("json", "jsonl"):
            values = _json_items if source.kind == "json" else iter_jsonl
            for line, obj in values(source.path):
                record, meta = _parse(obj, source.path, line)
                yield Item(record, source.split, meta, str(source.path), line)
            continue
        for split, row, value in _rows(source):
            where = f"{source.path}[{split}]" if source.kind == "datasets" else source.path
            record, meta = _parse(_clean(value), where, row)
            yield Item(record, split, _arrow_meta(meta), str(where), row)


# --------------------------------------------------------------------------- target formats


def to_paper(record: RaftRecord, path: object = "<record>", line: int | None = None) -> dict:
    """The paper's shape. The paper has no oracle flag (a reader finds the oracle by its text),
    so a record whose oracle position that rule would get wrong is refused."""
    target = record.oracle.strip()
    found = next((i for i, d in enumerate(record.documents) if d.text.strip() == target), None)
    if found != record.oracle_index:
        raise DataError(
            path,
            line,
            f"raft_paper cannot hold this record: its oracle_index is {record.oracle_index}, "
            f"but the paper's readers would find the oracle at {found}",
        )
    instruction = record.instruction
    if instruction is None:
        instruction = render_prompt(record.question, record.documents)
    return {
        "id": record.id,
        "type": "general",
        "question": record.question,
        "context": {
            "title": [[d.title or PAPER_PLACEHOLDER_TITLE for d in record.documents]],
            "sentences": [[d.text for d in record.documents]],
        },
        "oracle_context": record.oracle,
        "cot_answer": record.cot_answer,
        "instruction": instruction,
    }


def to_format(item: Item, fmt: str) -> dict:
    """One JSONL object in `fmt` (a JSONL format)."""
    record = item.record
    if fmt == "raft":
        obj = to_json(record)
        if item.meta is not None:
            obj["meta"] = item.meta
        return obj
    if fmt == "raft_paper":
        if not isinstance(record, RaftRecord):
            raise DataError(
                item.path,
                item.line,
                "a prompt/completion record has no documents, so it cannot become raft_paper",
            )
        return to_paper(record, item.path, item.line)
    example = to_example(record)
    if fmt == "prompt_completion":
        return to_json(example)
    if fmt == "chat":
        messages = [
            {"role": "user", "content": example.prompt},
            {"role": "assistant", "content": example.completion},
        ]
        return {"id": example.id, "messages": messages}
    if fmt == "instruction":
        prompt = example.prompt
        instruction = prompt[:-1] if prompt.endswith("\n") else prompt
        if not instruction.strip():
            raise DataError(item.path, item.line, "an empty prompt cannot become an instruction")
        return {"id": example.id, "instruction": instruction, "output": example.completion}
    raise ConfigError(f"--to: unknown format {fmt!r}; allowed: {', '.join(FORMATS)}")


def to_row(item: Item) -> dict:
    """Native columns for Parquet/datasets: every document carries a title ("" when none) so
    the column has one struct type, and meta is a JSON string because its keys vary."""
    obj = to_json(item.record)
    if isinstance(item.record, RaftRecord):
        obj["documents"] = [{"title": d.title, "text": d.text} for d in item.record.documents]
    if item.meta is not None:
        obj["meta"] = json.dumps(item.meta, ensure_ascii=False)
    return obj


def _schema(kinds: set[str], has_meta: bool) -> Any:
    import pyarrow as pa

    fields = [pa.field("id", pa.string())]
    if "raft" in kinds:
        document = pa.struct([("title", pa.string()), ("text", pa.string())])
        fields += [
            pa.field("question", pa.string()),
            pa.field("documents", pa.list_(document)),
            pa.field("oracle_index", pa.int64()),
            pa.field("oracle", pa.string()),
            pa.field("cot_answer", pa.string()),
            pa.field("instruction", pa.string()),
        ]
    if "example" in kinds:
        fields += [pa.field("prompt", pa.string()), pa.field("completion", pa.string())]
    if has_meta:
        fields.append(pa.field("meta", pa.string()))
    return pa.schema(fields)


# --------------------------------------------------------------------------- writers


class _JsonlSink:
    """Per split `DIR/<split>/shard-00000.jsonl` (plus a manifest for raft), or one file."""

    def __init__(self, root: Path, fmt: str, single: bool, inputs: Sequence[str]) -> None:
        self.root, self.fmt, self.single, self.inputs = root, fmt, single, list(inputs)
        self.handles: dict[str, Any] = {}
        self.counts: Counter = Counter()
        self.newline_added = 0

    def _relative(self, split: str) -> str:
        return f"{split}/shard-00000.jsonl"

    def add(self, item: Item) -> None:
        obj = to_format(item, self.fmt)
        if self.fmt == "instruction" and obj["instruction"] == to_example(item.record).prompt:
            self.newline_added += 1
        key = "" if self.single else item.split
        handle = self.handles.get(key)
        if handle is None:
            path = self.root if self.single else self.root / self._relative(key)
            path.parent.mkdir(parents=True, exist_ok=True)
            handle = self.handles[key] = open(path, "wb")
        handle.write((json.dumps(obj, ensure_ascii=False) + "\n").encode("utf-8"))
        self.counts[item.split] += 1

    def finish(self) -> None:
        for handle in self.handles.values():
            handle.close()
        if self.fmt == "raft" and not self.single:
            self._manifest()

    def _manifest(self) -> None:
        """A data set folder like `generate` writes, so training and validate read it as one."""
        splits = {}
        for split, count in self.counts.items():
            relative = self._relative(split)
            digest = hashlib.sha256((self.root / relative).read_bytes()).hexdigest()
            shards = [{"path": relative, "records": count, "sha256": digest}]
            splits[split] = {"records": count, "shards": shards}
        generator = {"name": "raft-dist convert", "settings": {"inputs": self.inputs}}
        manifest = {"format": "raft", "version": FORMAT_VERSION, "generator": generator}
        manifest["splits"] = splits
        text = json.dumps(manifest, indent=2, ensure_ascii=False) + "\n"
        write_atomic(self.root / MANIFEST, text.encode("utf-8"))


class _ArrowSink:
    """Parquet (`DIR/<split>.parquet` or one file) or a datasets folder, in batches of rows."""

    def __init__(self, root: Path, fmt: str, single: bool, schema: Any) -> None:
        self.root, self.fmt, self.single, self.schema = root, fmt, single, schema
        self.rows: dict[str, list[dict]] = {}
        self.writers: dict[str, Any] = {}
        self.counts: Counter = Counter()
        self.staging = root.with_name(root.name + ".arrow-staging")

    def add(self, item: Item) -> None:
        key = "" if self.single else item.split
        rows = self.rows.setdefault(key, [])
        rows.append(to_row(item))
        self.counts[item.split] += 1
        if len(rows) >= BATCH:
            self._flush(key)

    def _writer(self, key: str) -> Any:
        import pyarrow as pa
        import pyarrow.parquet as pq

        writer = self.writers.get(key)
        if writer is None:
            if self.fmt == "parquet":
                path = self.root if self.single else self.root / f"{key}.parquet"
                path.parent.mkdir(parents=True, exist_ok=True)
                writer = pq.ParquetWriter(str(path), self.schema)
            else:  # an Arrow stream that datasets memory-maps, so memory stays small
                self.staging.mkdir(parents=True, exist_ok=True)
                sink = pa.OSFile(str(self.staging / f"{key}.arrow"), "wb")
                writer = (pa.ipc.new_stream(sink, self.schema), sink)
            self.writers[key] = writer
        return writer

    def _flush(self, key: str) -> None:
        import pyarrow as pa

        rows = self.rows.get(key)
        if not rows:
            return
        table = pa.Table.from_pylist(rows, schema=self.schema)
        writer = self._writer(key)
        (writer if self.fmt == "parquet" else writer[0]).write_table(table)
        rows.clear()

    def finish(self) -> None:
        for key in list(self.rows):
            self._flush(key)
        for writer in self.writers.values():
            if self.fmt == "parquet":
                writer.close()
            else:
                writer[0].close()
                writer[1].close()
        if self.fmt == "datasets":
            self._save()

    def _save(self) -> None:
        import datasets

        bars = datasets.is_progress_bar_enabled()
        datasets.disable_progress_bars()  # one summary line is printed instead
        try:
            parts = {
                split: datasets.Dataset.from_file(str(self.staging / f"{split}.arrow"))
                for split in self.writers
            }
            datasets.DatasetDict(parts).save_to_disk(str(self.root))
            del parts
        finally:
            shutil.rmtree(self.staging, ignore_errors=True)
            if bars:
                datasets.enable_progress_bars()


# --------------------------------------------------------------------------- the command


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _target(fmt: str, out: Path, sources: Sequence[_Input]) -> bool:
    """Whether `out` is one file; refuses names that contradict the format."""
    suffix = ".parquet" if fmt == "parquet" else ".jsonl"
    if out.suffix in (".jsonl", ".parquet") and (fmt == "datasets" or out.suffix != suffix):
        what = "a datasets folder" if fmt == "datasets" else fmt
        raise ConfigError(f"--out {out}: a {out.suffix} name cannot hold {what}")
    resolved = out.resolve()
    for source in sources:
        path = source.path.resolve()
        if resolved == path or resolved in path.parents:
            raise ConfigError(f"--out {out} would replace the input {source.path}")
    return out.suffix == suffix and fmt != "datasets"


def convert(
    specs: Sequence[str], fmt: str, out: str | Path, *, overwrite: bool = False
) -> ConvertResult:
    """Read every input, write `fmt` to `out`; see the module docstring for what is kept."""
    if fmt not in FORMATS:
        raise ConfigError(f"--to: unknown format {fmt!r}; allowed: {', '.join(FORMATS)}")
    out = Path(out)
    sources = find_inputs(specs)
    single = _target(fmt, out, sources)
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise ConfigError(f"{out} exists; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.converting-{os.getpid()}")
    _remove(tmp)
    kinds: set[str] = set()
    has_meta = False
    if fmt in ("parquet", "datasets"):  # a first pass decides the columns
        for item in read_items(sources):
            kinds.add("raft" if isinstance(item.record, RaftRecord) else "example")
            has_meta = has_meta or item.meta is not None
    if fmt not in ("parquet", "datasets"):
        sink: _JsonlSink | _ArrowSink = _JsonlSink(tmp, fmt, single, [str(s) for s in specs])
    else:
        sink = _ArrowSink(tmp, fmt, single, _schema(kinds, has_meta))
    raft_records = metas = 0
    try:
        if not single:
            tmp.mkdir(parents=True)
        for item in read_items(sources):
            sink.add(item)
            raft_records += isinstance(item.record, RaftRecord)
            metas += item.meta is not None
        if not sink.counts:
            raise DataError(specs[0], None, "no records found")
        sink.finish()
    except BaseException:
        if isinstance(sink, _ArrowSink):
            shutil.rmtree(sink.staging, ignore_errors=True)
        _remove(tmp)
        raise
    if out.exists() or out.is_symlink():
        _remove(out)
    os.replace(tmp, out)
    result = ConvertResult(out, fmt, dict(sink.counts))
    if fmt in PROMPT_ONLY and raft_records:
        result.notes.append(
            f"{raft_records} RAFT records became prompt/completion pairs: documents, oracle and "
            "question are part of the prompt now and cannot be recovered separately"
        )
    if isinstance(sink, _JsonlSink) and sink.newline_added:
        result.notes.append(
            f"{sink.newline_added} prompts do not end in a newline; instruction/output reads "
            "them back with one"
        )
    if fmt not in KEEPS_META and metas:
        result.notes.append(f'"meta" of {metas} records dropped ({fmt} has no place for it)')
    return result
