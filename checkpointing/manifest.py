"""The manifest: the single file that makes a checkpoint exist.

A checkpoint directory is visible to readers only once `manifest.json` is committed in it (temp name, fsync,
rename, fsync dir) and the directory carries its final name `step-XXXXXXXX`. The manifest lists every chunk file
with its size, its crc32c and the crc32c of each of its blocks of `crc_block_bytes` (checksums.py), so readers
detect missing chunks (which zarr would silently read as fill values) and corrupt bytes, also when they read only
part of a chunk, and it carries the non-tensor state (`extra`) as JSON: nothing is ever unpickled.

Manifests written before block checksums existed have no `crc_block_bytes` and no `block_crc32c`: they load, every
chunk then read and verified whole. Older readers ignore both fields (the version stays 1).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from checkpointing.checksums import n_blocks
from checkpointing.errors import CheckpointCorruptError
from checkpointing.zarr_store import Grid, torch_dtype

FORMAT = "ecpt-checkpoint"
VERSION = 1
MANIFEST_NAME = "manifest.json"


@dataclass(frozen=True)
class ChunkRecord:
    """One chunk file: path relative to the checkpoint directory, size, crc32c of its bytes."""

    file: str
    nbytes: int
    crc32c: int
    blocks: str = ""
    """crc32c of each block of `block_bytes`, 8 hex digits each (checksums.ChunkCrcs.blocks); "" for zarr
    metadata files and in manifests written before block checksums existed."""
    block_bytes: int = 0
    """The manifest's crc_block_bytes when `blocks` is set, else 0 (kept here so a record reads on its own)."""


@dataclass
class TensorEntry:
    """One logical (global) tensor: real shape, torch dtype, chunking, and which chunks this copy holds."""

    shape: list[int]
    dtype: str
    layout: str  # "replica" (plain tensors) or "shard" (saved from Shard partitions)
    chunk_rows: int
    n_chunks: int
    chunks: dict[int, ChunkRecord] = field(default_factory=dict)

    def grid(self) -> Grid:
        itemsize = torch_dtype(self.dtype).itemsize
        return Grid(tuple(self.shape), itemsize, self.chunk_rows)

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.chunks.values())

    @property
    def complete(self) -> bool:
        return len(self.chunks) == self.n_chunks


@dataclass
class Manifest:
    """Everything a reader needs to trust and read one checkpoint copy on one level."""

    step: int
    level: str
    node_id: str
    node_local: bool
    world_size: int
    chunk_bytes: int
    tensors: dict[str, TensorEntry]
    extra: dict
    rank_extra: dict[int, dict] = field(default_factory=dict)  # per-rank extras that differ from rank 0's
    files: dict[str, ChunkRecord] = field(default_factory=dict)  # zarr.json metadata files
    created_unix: float = field(default_factory=time.time)
    crc_block_bytes: int = 0
    """Bytes per block of the chunk records' block crcs; 0: none recorded (a manifest from before them)."""

    @property
    def complete(self) -> bool:
        return all(t.complete for t in self.tensors.values())

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def to_json(self) -> dict:
        def rec(r: ChunkRecord) -> dict:
            out = {"file": r.file, "nbytes": r.nbytes, "crc32c": r.crc32c}
            return {**out, "block_crc32c": r.blocks} if r.blocks else out

        return {
            "format": FORMAT,
            "version": VERSION,
            "complete": self.complete,
            "step": self.step,
            "level": self.level,
            "node_id": self.node_id,
            "node_local": self.node_local,
            "world_size": self.world_size,
            "chunk_bytes": self.chunk_bytes,
            **({"crc_block_bytes": self.crc_block_bytes} if self.crc_block_bytes else {}),
            "tensors": {
                n: {
                    "shape": t.shape,
                    "dtype": t.dtype,
                    "layout": t.layout,
                    "chunk_rows": t.chunk_rows,
                    "n_chunks": t.n_chunks,
                    "chunks": {str(c): rec(r) for c, r in t.chunks.items()},
                }
                for n, t in self.tensors.items()
            },
            "extra": self.extra,
            "rank_extra": {str(r): e for r, e in self.rank_extra.items()},
            "files": {p: rec(r) for p, r in self.files.items()},
            "created_unix": self.created_unix,
        }

    @staticmethod
    def from_json(doc: dict, where: str) -> "Manifest":
        """Parse and validate; errors name the manifest path and the bad field."""
        if doc.get("format") != FORMAT or doc.get("version") != VERSION:
            raise CheckpointCorruptError(
                f"{where}: not an {FORMAT} v{VERSION} manifest (format={doc.get('format')!r}, "
                f"version={doc.get('version')!r})"
            )
        try:
            block_bytes = int(doc.get("crc_block_bytes", 0))
            if block_bytes < 0:
                raise ValueError(f"crc_block_bytes {block_bytes} < 0")
            tensors = {
                name: TensorEntry(
                    shape=[int(s) for s in t["shape"]],
                    dtype=str(t["dtype"]),
                    layout=str(t["layout"]),
                    chunk_rows=int(t["chunk_rows"]),
                    n_chunks=int(t["n_chunks"]),
                    chunks={int(c): _chunk_record(r, block_bytes) for c, r in t["chunks"].items()},
                )
                for name, t in doc["tensors"].items()
            }
            return Manifest(
                step=int(doc["step"]),
                level=str(doc["level"]),
                node_id=str(doc["node_id"]),
                node_local=bool(doc["node_local"]),
                world_size=int(doc["world_size"]),
                chunk_bytes=int(doc["chunk_bytes"]),
                tensors=tensors,
                extra=dict(doc["extra"]),
                rank_extra={int(r): dict(e) for r, e in doc.get("rank_extra", {}).items()},
                files={
                    p: ChunkRecord(str(r["file"]), int(r["nbytes"]), int(r["crc32c"]))
                    for p, r in doc.get("files", {}).items()
                },
                created_unix=float(doc["created_unix"]),
                crc_block_bytes=block_bytes,
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise CheckpointCorruptError(f"{where}: malformed manifest field ({type(e).__name__}: {e})") from e


def _chunk_record(r: dict, block_bytes: int) -> ChunkRecord:
    """One chunk's record; its block list, if any, must be hex digits, 8 per block (ValueError otherwise)."""
    blocks = str(r.get("block_crc32c", ""))
    record = ChunkRecord(str(r["file"]), int(r["nbytes"]), int(r["crc32c"]), blocks, block_bytes if blocks else 0)
    if not blocks:
        return record
    n = n_blocks(record.nbytes, block_bytes) if block_bytes else 0
    try:
        valid = n and len(blocks) == 8 * n and len(bytes.fromhex(blocks)) == 4 * n
    except ValueError:  # not hex digits
        valid = False
    if not valid:
        raise ValueError(
            f"chunk {record.file}: block_crc32c {blocks[:24]!r}... is not 8 hex digits for each of the "
            f"{n} blocks of {block_bytes} bytes in {record.nbytes}"
        )
    return record


def read_manifest(ckpt_dir: Path) -> Manifest:
    """Load `<ckpt_dir>/manifest.json`; CheckpointCorruptError if absent, unreadable or malformed."""
    path = Path(ckpt_dir) / MANIFEST_NAME
    try:
        doc = json.loads(path.read_bytes())
    except FileNotFoundError as e:
        raise CheckpointCorruptError(f"{path}: no committed manifest (an interrupted save)") from e
    except (OSError, ValueError) as e:
        raise CheckpointCorruptError(f"{path}: unreadable manifest ({e})") from e
    return Manifest.from_json(doc, str(path))


class ManifestEncoder:
    """Encodes manifests of one tensor layout, save after save, without building objects: the JSON of each tensor's
    fixed fields (shape, dtype, chunking) is encoded once; a save adds its chunk records, extra and files.

    Tensor names and chunk files are JSON-safe by construction (zarr_store.check_tensor_name); the result parses
    to exactly what Manifest.to_json() gives."""

    def __init__(self, tensors: dict[str, tuple[list[int], str, str, int, int]]) -> None:
        """tensors: name -> (shape, dtype, layout, chunk_rows, n_chunks)."""
        self.heads = {
            name: (
                json.dumps(name)
                + ':{"shape":'
                + json.dumps(list(shape))
                + ',"dtype":'
                + json.dumps(dtype)
                + ',"layout":'
                + json.dumps(layout)
                + f',"chunk_rows":{rows}'
                + f',"n_chunks":{n},"chunks":{{'
            )
            for name, (shape, dtype, layout, rows, n) in tensors.items()
        }
        self.n_chunks = {name: t[4] for name, t in tensors.items()}

    def encode(
        self,
        *,
        step: int,
        level: str,
        node_id: str,
        node_local: bool,
        world_size: int,
        chunk_bytes: int,
        records: list[list],
        extra: dict,
        rank_extra: dict[int, dict],
        files: dict[str, ChunkRecord],
        crc_block_bytes: int,
    ) -> bytes:
        """records: [name, chunk, file, nbytes, crc32c, block crcs (hex, checksums.ChunkCrcs.blocks)] per chunk. The
        block crcs go between quotes unescaped: they are hex digits by construction (computed by checksums.py, or
        copied from a record _chunk_record validated)."""
        chunks: dict[str, list[str]] = {name: [] for name in self.heads}
        for name, chunk, rel, nbytes, crc, blocks in records:
            chunks[name].append(
                f'"{int(chunk)}":{{"file":"{rel}","nbytes":{int(nbytes)},"crc32c":{int(crc)}'
                + (f',"block_crc32c":"{blocks}"}}' if blocks else "}")
            )
        complete = all(len(chunks[n]) == k for n, k in self.n_chunks.items())
        body = ",".join(head + ",".join(chunks[name]) + "}}" for name, head in self.heads.items())
        files_json = ",".join(
            f'"{rel}":{{"file":"{r.file}","nbytes":{r.nbytes},"crc32c":{r.crc32c}}}' for rel, r in files.items()
        )
        doc = (
            f'{{"format":"{FORMAT}","version":{VERSION},"complete":{"true" if complete else "false"},'
            f'"step":{int(step)},"level":{json.dumps(level)},"node_id":{json.dumps(node_id)},'
            f'"node_local":{"true" if node_local else "false"},"world_size":{int(world_size)},'
            f'"chunk_bytes":{int(chunk_bytes)},"crc_block_bytes":{int(crc_block_bytes)},'
            f'"tensors":{{{body}}},"extra":{json.dumps(extra)},'
            f'"rank_extra":{json.dumps({str(r): e for r, e in rank_extra.items()})},"files":{{{files_json}}},'
            f'"created_unix":{time.time()!r}}}'
        )
        return doc.encode()
