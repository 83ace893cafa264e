"""PDF sources for `raft-dist generate`: the text layer through pypdf, an optional extra
(`pip install 'raft-dist[pdf]'`), so that the base install stays small."""

from __future__ import annotations

import io
import re
from pathlib import Path

from raft_dist.errors import DataError

INSTALL_HINT = "install raft-dist[pdf] (pip install 'raft-dist[pdf]') to read PDF files"
_HYPHENATED = re.compile(r"(\w)-\n(\w)")


def pdf_text(path: Path, data: bytes) -> str:
    """All pages' text, pages separated by a blank line, words hyphenated across a line break
    joined again. Scanned pages have no text layer: a PDF without any text is an error."""
    try:
        import pypdf
    except ImportError:
        raise DataError(path, None, INSTALL_HINT) from None
    try:
        reader = pypdf.PdfReader(io.BytesIO(data))
        if reader.is_encrypted and not reader.decrypt(""):
            raise DataError(path, None, "the PDF is encrypted with a password")
        pages = [page.extract_text() or "" for page in reader.pages]
    except DataError:
        raise
    except Exception as exc:  # pypdf raises many types for broken files
        raise DataError(path, None, f"cannot read PDF: {exc}") from None
    text = _HYPHENATED.sub(r"\1\2", "\n\n".join(page.strip() for page in pages))
    if not text.strip():
        raise DataError(
            path, None, "the PDF has no text layer (scanned pages need OCR before generate)"
        )
    return text
