"""Document sources: random-access sequences of text documents (Grain's data-source protocol).

Kinds: "text" (files and directories of text files; one file = one document), "jsonl" (one
JSON object per line, text in `field`), "parquet" (a string column; needs `pyarrow`),
"arrayrecord" (UTF-8 records), "stdlib" (the running interpreter's standard-library `.py`
files: real text that exists offline on every machine; the default corpus).
Problems with the input (nothing found, a file that cannot be read or is not UTF-8 text)
raise `DataError` naming the file, before any training starts.
"""

from __future__ import annotations

import glob
import json
import os
import sysconfig
from collections.abc import Sequence

TEXT_EXTENSIONS = (".txt", ".md", ".rst", ".py", ".text", ".json", ".c", ".h", ".html")
_PROBE_BYTES = 1 << 16


class DataError(ValueError):
    """The training data cannot be used (user error): the message names the cause."""


def _check_text_file(path: str) -> None:
    """Open the file and decode its start as UTF-8, so bad input fails early and clearly."""
    try:
        with open(path, "rb") as f:
            head = f.read(_PROBE_BYTES)
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        import codecs

        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path} is not UTF-8 text (byte {e.start}): is it a binary file?"
        ) from None


class TextFiles:
    """One document per file."""

    def __init__(self, paths: Sequence[str], *, skip_bad: bool = False):
        self.paths = []
        for p in paths:
            try:
                _check_text_file(p)
            except DataError:
                if not skip_bad:
                    raise
                continue
            self.paths.append(p)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> str:
        path = self.paths[i]
        try:
            with open(path, encoding="utf-8") as f:
                return f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"cannot read {path} as UTF-8 text: {e}") from None


class JsonlDocs:
    """Line-offset index over JSONL files; each line's `field` is one document."""

    def __init__(self, paths: Sequence[str], field: str = "text"):
        self.field = field
        self._index: list[tuple[str, int]] = []
        for p in paths:
            try:
                with open(p, "rb") as f:
                    offset = 0
                    for line in f:
                        if line.strip():
                            self._index.append((p, offset))
                        offset += len(line)
            except OSError as e:
                raise DataError(f"cannot read {p}: {e.strerror or e}") from None
        if self._index:
            self[0]  # fail early on a malformed first record

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, i: int) -> str:
        path, offset = self._index[i]
        with open(path, "rb") as f:
            f.seek(offset)
            line = f.readline()
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{path} at byte {offset}: not a JSON line ({e})") from None
        if not isinstance(record, dict) or not isinstance(record.get(self.field), str):
            raise DataError(f"{path} at byte {offset}: no string field {self.field!r}")
        return record[self.field]


class ParquetDocs:
    """A string column of Parquet files, read into memory (needs `pyarrow`)."""

    def __init__(self, paths: Sequence[str], field: str = "text"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError(
                "reading Parquet needs the 'pyarrow' package: pip install pyarrow"
            ) from None
        self._docs: list[str] = []
        for p in paths:
            try:
                table = pq.read_table(p, columns=[field])
            except Exception as e:
                raise DataError(f"cannot read column {field!r} of Parquet file {p}: {e}") from None
            self._docs.extend(s for s in table.column(field).to_pylist() if s is not None)

    def __len__(self) -> int:
        return len(self._docs)

    def __getitem__(self, i: int) -> str:
        return self._docs[i]


class ArrayRecordDocs:
    """UTF-8 text records of ArrayRecord files (through Grain's ArrayRecordDataSource)."""

    def __init__(self, paths: Sequence[str]):
        import grain

        for p in paths:
            if not os.path.isfile(p):
                raise DataError(f"cannot read {p}: no such file")
        try:
            self._src = grain.sources.ArrayRecordDataSource(list(paths))
        except Exception as e:
            raise DataError(f"cannot open ArrayRecord files {list(paths)}: {e}") from None

    def __len__(self) -> int:
        return len(self._src)

    def __getitem__(self, i: int) -> str:
        record = self._src[i]
        try:
            return record.decode("utf-8")
        except UnicodeDecodeError:
            raise DataError(f"ArrayRecord record {i} is not UTF-8 text") from None


def stdlib_python_files() -> list[str]:
    """The interpreter's standard-library `.py` files (no site-packages), sorted."""
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for p in glob.glob(os.path.join(root, "**", "*.py"), recursive=True):
        rel = os.path.relpath(p, root)
        if "site-packages" in rel or "dist-packages" in rel or not os.path.isfile(p):
            continue
        files.append(p)
    return sorted(files)


def _expand(paths: Sequence[str], exts: tuple[str, ...]) -> list[str]:
    out: list[str] = []
    for p in paths:
        if os.path.isdir(p):
            found = [
                f
                for f in glob.glob(os.path.join(p, "**", "*"), recursive=True)
                if os.path.isfile(f) and f.endswith(exts)
            ]
            out.extend(sorted(found))
        elif os.path.exists(p) or os.path.islink(p):
            out.append(p)
        else:
            matches = sorted(glob.glob(p))
            if not matches:
                raise DataError(f"no such file or directory: {p}")
            out.extend(matches)
    return out


def _kind_of(path: str) -> str:
    for suffix, kind in (
        (".jsonl", "jsonl"),
        (".parquet", "parquet"),
        (".array_record", "arrayrecord"),
        (".arrayrecord", "arrayrecord"),
    ):
        if path.endswith(suffix):
            return kind
    return "text"


def open_source(source: str, kind: str = "auto", field: str = "text"):
    """A document source from `source`: "stdlib", or comma-separated files/dirs/globs."""
    if source == "stdlib":
        # A few stdlib test files are deliberately not UTF-8 (encoding tests): skip them.
        docs = TextFiles(stdlib_python_files(), skip_bad=True)
        if not len(docs):
            raise DataError(f"no .py files under {sysconfig.get_paths()['stdlib']}")
        return docs
    parts = [p for p in source.split(",") if p]
    if not parts:
        raise DataError("empty data source")
    exts = TEXT_EXTENSIONS + (".jsonl", ".parquet", ".array_record", ".arrayrecord")
    files = _expand(parts, exts)
    if not files:
        raise DataError(f"no data files found in {source}")
    if kind == "auto":
        kinds = {_kind_of(f) for f in files}
        if len(kinds) > 1:
            raise DataError(f"{source} mixes file kinds {sorted(kinds)}; pass one kind at a time")
        kind = kinds.pop()
    if kind == "text":
        docs = TextFiles(files)
    elif kind == "jsonl":
        docs = JsonlDocs(files, field)
    elif kind == "parquet":
        docs = ParquetDocs(files, field)
    elif kind == "arrayrecord":
        docs = ArrayRecordDocs(files)
    else:
        raise DataError(f"unknown data kind {kind!r}; want auto, text, jsonl, parquet, arrayrecord")
    if not len(docs):
        raise DataError(f"no documents in {source}")
    return docs
