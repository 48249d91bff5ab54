"""Where documents come from: the builtin corpus, text files, JSONL, parquet and pre-tokenized token arrays.

A source in ``data.sources`` is 'builtin:prose|python|c' or a path or glob. Matched files are read by their suffix:
``.jsonl`` (one document per line, the string under ``data.field``), ``.parquet`` (one document per row of the
string column ``data.field``), ``.npy`` / ``.zarr`` (pre-tokenized 1-D uint8/16/32 arrays, the last
``val_fraction`` of their tokens held out), anything else a text file (the whole file is one document). A malformed
line or row is an error naming the file and the line or row.

The builtin corpus is text every Python installation carries: English prose (the language reference topics shipped
in ``pydoc_data``, standard-library docstrings, licence texts), Python source (the standard library) and C (Python's
C headers).
"""

from __future__ import annotations

import ast
import glob
import hashlib
import itertools
import json
import os
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from elastic.errors import ConfigError

BUILTIN_DOMAINS = ("prose", "python", "c")
BUILTIN_MAX_BYTES = 3_000_000
"""Cap per builtin domain: a few MB is far more than a CPU run consumes, and keeps the first build to seconds."""
ARRAY_SUFFIXES = (".npy", ".zarr")


@dataclass(frozen=True)
class Document:
    name: str
    """Stable name (path relative to the source's glob base, plus ':line' or '#row'): decides the validation split."""
    text: bytes | str
    """The document's content: bytes from text files and the builtin corpus, str from JSONL and parquet."""
    source_bytes: int
    """Bytes of the source files this document accounts for (progress and ETA)."""


# ---------------------------------------------------------------------------------------------------------------
# The builtin domains: (name, bytes) in a deterministic order.


def _stdlib_py_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "test", "tests", "idle_test", "__pycache__", "dist-packages"}
    files = [p for p in root.rglob("*.py") if not skip.intersection(p.relative_to(root).parts)]
    # A hash order spreads the capped subset over the whole library instead of the first letters of the alphabet.
    return sorted(files, key=lambda p: hashlib.sha1(str(p.relative_to(root)).encode()).hexdigest())


def _take_until(docs, cap: int) -> list[tuple[str, bytes]]:
    taken, size = [], 0
    for name, data in docs:
        if not data:
            continue
        taken.append((name, data))
        size += len(data)
        if size >= cap:
            break
    return taken


def _python_docs():
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in _stdlib_py_files():
        yield str(path.relative_to(root)), path.read_bytes()


def _docstrings(source: bytes) -> str:
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return ""
    nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))]
    texts = [ast.get_docstring(n, clean=True) for n in nodes]
    return "\n\n".join(t for t in texts if t and len(t) > 40)


def _prose_docs():
    import pydoc_data.topics  # the language reference and library topics as plain English text

    for key in sorted(pydoc_data.topics.topics):
        yield f"pydoc_topics/{key}", pydoc_data.topics.topics[key].encode()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for lic in sorted(stdlib.glob("LICENSE*")):
        yield f"license/{lic.name}", lic.read_bytes()
    for name, source in _python_docs():
        yield f"docstrings/{name}", _docstrings(source).encode()


def _c_docs():
    root = Path(sysconfig.get_paths()["include"])
    if not any(root.rglob("*.h")):  # Python's headers are not installed: system headers (machine-dependent)
        root = Path("/usr/include")
    for path in sorted(root.rglob("*.h")):
        yield str(path.relative_to(root)), path.read_bytes()


BUILTIN_SOURCES = {"prose": _prose_docs, "python": _python_docs, "c": _c_docs}


def builtin_documents(name: str) -> list[Document]:
    return [Document(n, data, len(data)) for n, data in _take_until(BUILTIN_SOURCES[name](), BUILTIN_MAX_BYTES)]


# ---------------------------------------------------------------------------------------------------------------
# Expanding and checking sources (cheap: globs and stat only, so the config validation can run it).


def expand(pattern: str, where: str) -> list[Path]:
    matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
    if not matches:
        raise ConfigError(f"{where}: {pattern!r} matches no file; fix the path or glob in data.sources")
    return [Path(m) for m in matches if not Path(m).is_dir() or m.endswith(".zarr")]


def glob_base(pattern: str) -> Path:
    """The directory part of a pattern before its first wildcard: document names are taken relative to it, so
    the validation split does not depend on where the data lives."""
    parts = Path(os.path.expanduser(pattern)).parts
    fixed = [p for p in itertools.takewhile(lambda p: not any(c in p for c in "*?["), parts)]
    base = Path(*fixed) if fixed else Path(".")
    return base.parent if base.is_file() else base


def check_source(src: str, where: str, field: str = "text") -> list[Path]:
    """The files a source names; a source that matches no file, or only empty documents, is an error.

    Cheap for real data: the scan stops at the first document with text, normally the first line or row of the
    first file (a malformed one is reported here already); only a source without any text is read to its end."""
    if src.startswith("builtin:"):
        if src.removeprefix("builtin:") not in BUILTIN_SOURCES:
            raise ConfigError(
                f"{where}: unknown builtin {src!r}; use one of {['builtin:' + b for b in BUILTIN_DOMAINS]}"
            )
        return []
    paths = expand(src, where)
    if not paths:
        raise ConfigError(f"{where}: {src!r} matches only directories; name the files (e.g. DIR/*.jsonl)")
    if not any(_has_content(p, src, field, where) for p in paths):
        raise ConfigError(f"{where}: {src!r} holds only empty documents ({len(paths)} files); there is no text")
    return paths


def _has_content(path: Path, src: str, field: str, where: str) -> bool:
    if is_token_array(path):
        return open_token_array(path, where).shape[0] > 0
    if path.stat().st_size == 0:
        return False
    if path.suffix not in (".jsonl", ".parquet"):
        return True  # a text file with bytes is a document with text
    return any(doc.text for doc in read_documents(path, src, field))


def source_identity(src: str) -> list:
    """What the corpus cache key records for a source: its name for builtins, else every matched file's absolute
    path, size and modification time (not a content hash: hashing terabytes at every start costs too much)."""
    if src.startswith("builtin:"):
        return [src]
    entries = []
    for path in sorted(glob.glob(os.path.expanduser(src), recursive=True)):
        st = os.stat(path)
        entries.append([os.path.abspath(path), st.st_size, st.st_mtime_ns])
    return entries


# ---------------------------------------------------------------------------------------------------------------
# Reading documents and token arrays.


def is_token_array(path: Path) -> bool:
    return path.suffix in ARRAY_SUFFIXES


def open_token_array(path: Path, where: str):
    """A pre-tokenized array, memory-mapped (.npy) or opened lazily (.zarr)."""
    if path.suffix == ".npy":
        tokens = np.load(path, mmap_mode="r", allow_pickle=False)
    else:
        import zarr

        tokens = zarr.open_array(str(path), mode="r")
    if tokens.ndim != 1 or tokens.dtype not in (np.uint8, np.uint16, np.uint32):
        raise ConfigError(
            f"{where}: {path} must be a 1-D uint8/uint16/uint32 token array, "
            f"got shape {tokens.shape} dtype {tokens.dtype}"
        )
    return tokens


def _jsonl_documents(path: Path, name: str, field: str) -> Iterator[Document]:
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise ConfigError(f"{path}, line {number}: not valid JSON ({exc}); fix or remove the line") from exc
            problem = (
                f"expected a JSON object, got a JSON {type(record).__name__}"
                if not isinstance(record, dict)
                else f"no field {field!r} (data.field); its fields are {sorted(record)[:10]}"
                if field not in record
                else f"field {field!r} is a {type(record[field]).__name__}, not a string"
                if not isinstance(record[field], str)
                else ""
            )
            if problem:
                raise ConfigError(f"{path}, line {number}: {problem}")
            yield Document(f"{name}:{number}", record[field], len(line))


def _parquet_documents(path: Path, name: str, field: str) -> Iterator[Document]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        file = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise ConfigError(f"{path}: not a readable parquet file ({exc})") from exc
    schema = file.schema_arrow
    if field not in schema.names:
        raise ConfigError(f"{path}: no column {field!r} (data.field); its columns are {schema.names}")
    kind = schema.field(field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise ConfigError(f"{path}: column {field!r} (data.field) must hold strings, it is {kind}")
    rows = file.metadata.num_rows
    size = path.stat().st_size
    row = 0
    try:
        for batch in file.iter_batches(columns=[field], batch_size=4096):
            for text in batch.column(0).to_pylist():
                if text is None:
                    raise ConfigError(f"{path}, row {row}: column {field!r} is null; drop the row or fill it")
                yield Document(f"{name}#{row}", text, size // max(rows, 1))
                row += 1
    except (pa.ArrowInvalid, OSError) as exc:
        raise ConfigError(f"{path}, row {row}: unreadable ({exc})") from exc


def read_documents(path: Path, src: str, field: str) -> Iterator[Document]:
    """The documents of one matched file (not a token array)."""
    name = str(path.relative_to(glob_base(src)))
    if path.suffix == ".jsonl":
        yield from _jsonl_documents(path, name, field)
    elif path.suffix == ".parquet":
        yield from _parquet_documents(path, name, field)
    else:
        data = path.read_bytes()
        yield Document(name, data, len(data))


def source_bytes(src: str) -> int:
    """Bytes a source will read (the progress bar's total)."""
    if src.startswith("builtin:"):
        return BUILTIN_MAX_BYTES
    return sum(p.stat().st_size for p in map(Path, glob.glob(os.path.expanduser(src), recursive=True)) if p.is_file())
