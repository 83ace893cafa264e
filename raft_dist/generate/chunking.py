"""Source files -> sentence-aligned chunks of at most `chunk_size` characters.

A chunk never cuts a sentence in two unless that sentence alone is longer than the limit, because
the template backend quotes whole sentences and a quote must occur verbatim in its chunk.
Chunk ids are positions in one deterministic order (sources as given, folders sorted), so the
same sources always give the same chunks.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from raft_dist.errors import ConfigError, DataError

SOURCE_SUFFIXES = (".txt", ".md", ".jsonl", ".pdf")  # .pdf needs the [pdf] extra
MIN_CHUNK_SIZE = 100

# A sentence ends at . ! or ? (plus closing quotes/brackets) when whitespace and a capital letter,
# digit or opening quote follow. Abbreviations and initials are checked separately.
_BOUNDARY = re.compile(
    r"[.!?]+[\"'\u201d\u2019)\]]*(?=\s+[\"'\u201c\u2018(\[]?[A-Z0-9\u00c0-\u00de])"
)
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr st prof sr jr vs etc e.g i.e no fig mt gen col lt capt rev approx inc ltd co"
    " jan feb mar apr jun jul aug sep sept oct nov dec".split()
)
_MD_HEADING = re.compile(r"^\s{0,3}#{1,6}\s+(.*?)\s*#*\s*$")
_MD_LIST_ITEM = re.compile(r"^\s*(?:[-*+]|\d{1,3}[.)])\s+")
_MD_RULE = re.compile(r"^\s{0,3}(?:[-*_]\s*){3,}$")
_MD_FENCE = re.compile(r"^\s*(```|~~~)")


@dataclass(frozen=True)
class SourceFile:
    """One input file as the manifest records it (its hash makes re-runs detect edits)."""

    path: str
    sha256: str
    bytes: int


@dataclass(frozen=True, slots=True)
class Chunk:
    id: int
    text: str
    title: str
    source: int  # index into the corpus's source list


@dataclass
class Corpus:
    sources: list[SourceFile]
    chunks: list[Chunk]


# --------------------------------------------------------------------------- finding sources


def find_sources(specs: Sequence[str], *, exclude: Path | None = None) -> list[Path]:
    """Files named by `specs` in a stable order; folders are searched recursively (hidden entries
    skipped) and anything under `exclude` (the output folder) is left out."""
    if not specs:
        raise ConfigError("no source given: name at least one file or folder")
    excluded = exclude.resolve() if exclude is not None else None
    found: list[Path] = []
    seen: set[Path] = set()
    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            files = sorted(_walk(path, excluded))
            if not files:
                raise DataError(path, None, "the folder holds no .txt, .md, .jsonl or .pdf file")
        elif path.exists():
            files = [path]
        else:
            raise DataError(path, None, "no such file or folder")
        for file in files:
            if file.suffix.lower() not in SOURCE_SUFFIXES:
                raise DataError(
                    file,
                    None,
                    f"unsupported file type '{file.suffix or file.name}' "
                    "(supported: .txt, .md, .jsonl, .pdf)",
                )
            key = file.resolve()
            if key not in seen:
                seen.add(key)
                found.append(file)
    return found


def _walk(folder: Path, excluded: Path | None) -> Iterator[Path]:
    for entry in folder.iterdir():
        if entry.name.startswith("."):
            continue
        if excluded is not None and entry.resolve() == excluded:
            continue
        if entry.is_dir():
            yield from _walk(entry, excluded)
        elif entry.is_file():
            yield entry


def hash_source(path: Path) -> SourceFile:
    """Hash without decoding: enough to tell whether a finished data set is up to date."""
    digest = hashlib.sha256()
    size = 0
    try:
        with path.open("rb") as handle:
            while block := handle.read(1 << 20):
                digest.update(block)
                size += len(block)
    except OSError as exc:
        raise DataError(path, None, f"cannot read file: {exc.strerror or exc}") from None
    return SourceFile(path=str(path), sha256=digest.hexdigest(), bytes=size)


# --------------------------------------------------------------------------- reading sources


def read_source(path: Path) -> tuple[SourceFile, str]:
    """Strict UTF-8 text; binary, empty and unreadable files are errors that name the file."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(path, None, f"cannot read file: {exc.strerror or exc}") from None
    source = SourceFile(path=str(path), sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
    if path.suffix.lower() == ".pdf":
        from raft_dist.generate.pdf import pdf_text

        return source, pdf_text(path, data)
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    nul = data.find(b"\x00")
    if nul >= 0:
        raise DataError(path, None, f"binary file (NUL byte at offset {nul}), expected text")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(
            path,
            None,
            f"not UTF-8 text: invalid byte 0x{data[exc.start]:02x} at offset {exc.start}",
        ) from None
    if not text.strip():
        raise DataError(path, None, "the file is empty")
    return source, text


def title_from_name(path: Path) -> str:
    """'02-corran-point_lighthouse.md' -> 'Corran point lighthouse'."""
    stem = re.sub(r"^\d+[-_ ]+", "", path.stem) or path.stem
    words = re.sub(r"[-_]+", " ", stem).split()
    return " ".join(words).capitalize() if words else path.stem


def documents(path: Path, text: str) -> Iterator[tuple[str, list[str]]]:
    """(title, paragraphs) for each document in one source file."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        yield from _jsonl_documents(path, text)
    elif suffix == ".md":
        yield _markdown(text, title_from_name(path))
    else:
        yield title_from_name(path), _plain_paragraphs(text.splitlines())


def _jsonl_documents(path: Path, text: str) -> Iterator[tuple[str, list[str]]]:
    fallback = title_from_name(path)
    # split("\n"), not splitlines(): JSON strings may hold U+2028 and other line separators.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(
                path, number, f"malformed JSON: {exc.msg} (column {exc.colno})"
            ) from None
        if not isinstance(obj, dict) or "text" not in obj:
            raise DataError(path, number, 'each line must be a JSON object with a "text" field')
        body = obj["text"]
        if not isinstance(body, str) or not body.strip():
            raise DataError(path, number, 'field "text" must be a non-empty string')
        title = obj.get("title")
        title = title.strip() if isinstance(title, str) and title.strip() else fallback
        yield title, _plain_paragraphs(body.splitlines())


def _plain_paragraphs(lines: Iterable[str]) -> list[str]:
    """Blank lines separate paragraphs; hard-wrapped lines inside one are joined."""
    paragraphs: list[str] = []
    current: list[str] = []
    for line in lines:
        if line.strip():
            current.append(line)
        elif current:
            paragraphs.append(" ".join(" ".join(current).split()))
            current = []
    if current:
        paragraphs.append(" ".join(" ".join(current).split()))
    return paragraphs


def _markdown(text: str, fallback_title: str) -> tuple[str, list[str]]:
    """A leading heading becomes the title; later headings and list items are paragraphs of
    their own, so no sentence runs across them."""
    title: str | None = None
    paragraphs: list[str] = []
    current: list[str] = []

    def close() -> None:
        if current:
            paragraphs.append(" ".join(" ".join(current).split()))
            current.clear()

    for line in text.splitlines():
        if _MD_FENCE.match(line) or _MD_RULE.match(line):
            close()
            continue
        heading = _MD_HEADING.match(line)
        if heading:
            close()
            words = heading.group(1).strip()
            if title is None and not paragraphs:
                title = words
            elif words:
                paragraphs.append(words)
            continue
        if not line.strip():
            close()
            continue
        item = _MD_LIST_ITEM.match(line)
        if item:
            close()
            line = line[item.end() :]
        current.append(line)
    close()
    return title or fallback_title, paragraphs


# --------------------------------------------------------------------------- sentences and chunks


def split_sentences(paragraph: str) -> list[str]:
    """Sentences of one whitespace-normalized paragraph; 'Dr. Smith' and 'J. Smith' stay whole."""
    sentences: list[str] = []
    start = 0
    for match in _BOUNDARY.finditer(paragraph):
        end = match.end()
        if paragraph[match.start()] == "." and end - match.start() == 1:
            word_start = paragraph.rfind(" ", start, match.start()) + 1
            word = paragraph[word_start : match.start()]
            if (len(word) == 1 and word.isalpha()) or word.lower() in _ABBREVIATIONS:
                continue
        sentence = paragraph[start:end].strip()
        if sentence:
            sentences.append(sentence)
        start = end
    tail = paragraph[start:].strip()
    if tail:
        sentences.append(tail)
    return sentences


def _pieces(sentence: str, limit: int) -> list[str]:
    """Cut a sentence longer than the limit at spaces (or anywhere, for one huge word)."""
    pieces: list[str] = []
    rest = sentence
    while len(rest) > limit:
        cut = rest.rfind(" ", 0, limit + 1)
        if cut <= 0:
            cut = limit
        pieces.append(rest[:cut].strip())
        rest = rest[cut:].strip()
    if rest:
        pieces.append(rest)
    return pieces


def chunk_paragraphs(paragraphs: Sequence[str], chunk_size: int, overlap: int = 0) -> list[str]:
    """Greedy packing of whole sentences into chunks of at most `chunk_size` characters.

    Sentences of one paragraph are joined by a space, paragraphs by a newline. A chunk that is
    at least half full ends where a paragraph ends, so chunks follow the author's units rather
    than cutting the next paragraph after its first sentences. With `overlap`,
    a chunk starts with up to that many trailing sentences of the previous one (fewer when they
    would not leave room for a new sentence), so every chunk adds new text.
    """
    units: list[tuple[str, str]] = []  # (separator before the unit, text)
    for paragraph in paragraphs:
        sep = "\n"
        for sentence in split_sentences(paragraph):
            for piece in (
                _pieces(sentence, chunk_size) if len(sentence) > chunk_size else [sentence]
            ):
                units.append((sep, piece))
                sep = " "
    chunks: list[str] = []
    current: list[tuple[str, str]] = []
    length = 0
    for unit in units:
        full = length + 1 + len(unit[1]) > chunk_size
        if current and (full or (unit[0] == "\n" and 2 * length >= chunk_size)):
            chunks.append(_join(current))
            carry = current[len(current) - overlap :] if overlap else []
            while carry and _length(carry) + 1 + len(unit[1]) > chunk_size:
                carry.pop(0)
            current = carry
            length = _length(carry)
        length += len(unit[1]) + (1 if current else 0)
        current.append(unit)
    if current:
        chunks.append(_join(current))
    return chunks


def _length(units: Sequence[tuple[str, str]]) -> int:
    return sum(len(text) for _, text in units) + max(len(units) - 1, 0)


def _join(units: Sequence[tuple[str, str]]) -> str:
    parts = [units[0][1]]
    for sep, text in units[1:]:
        parts.append(sep)
        parts.append(text)
    return "".join(parts)


def check_chunking(chunk_size: int, overlap: int) -> None:
    if chunk_size < MIN_CHUNK_SIZE:
        raise ConfigError(
            f"--chunk-size must be at least {MIN_CHUNK_SIZE} characters, got {chunk_size}"
        )
    if overlap < 0:
        raise ConfigError(f"--chunk-overlap must be 0 or more sentences, got {overlap}")


def load_corpus(
    files: Sequence[Path], chunk_size: int, overlap: int = 0, *, progress: bool = False
) -> Corpus:
    """Read, check and chunk every file before anything is written; identical chunk texts are
    kept once so an example can never hold the same text twice."""
    from tqdm import tqdm

    check_chunking(chunk_size, overlap)
    sources: list[SourceFile] = []
    chunks: list[Chunk] = []
    seen: set[str] = set()
    with tqdm(files, desc="read sources", unit="file", disable=not progress) as bar:
        for file in bar:
            info, text = read_source(file)
            source = len(sources)
            sources.append(info)
            for title, paragraphs in documents(file, text):
                for piece in chunk_paragraphs(paragraphs, chunk_size, overlap):
                    if piece not in seen:
                        seen.add(piece)
                        chunks.append(Chunk(len(chunks), piece, title, source))
    return Corpus(sources=sources, chunks=chunks)
