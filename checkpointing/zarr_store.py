"""On-disk layout: one zarr v3 group per checkpoint, one array per logical tensor, raw chunk files.

We write the zarr v3 metadata (`zarr.json`) and the chunk files ourselves instead of going through zarr-python:
we need to control fsync, compute checksums of exactly the bytes written, write each chunk from whichever rank owns
it without a create-then-barrier round, and avoid zarr's silent fill values. The result is a plain zarr v3
hierarchy (`compressors=None`, regular grid chunked along dim 0, `bytes` codec little endian) that `zarr.open`
reads; tests check that.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import crc32c
import torch

from checkpointing import direct_io
from checkpointing.checksums import BlockChecksummer, ChunkCrcs
from checkpointing.errors import CheckpointError

# torch dtype name -> zarr data_type. bfloat16 has no zarr/numpy dtype: stored as uint16 plus `torch_dtype`.
_ZARR_DTYPE: dict[str, str] = {
    "float64": "float64",
    "float32": "float32",
    "float16": "float16",
    "bfloat16": "uint16",
    "int64": "int64",
    "int32": "int32",
    "int16": "int16",
    "int8": "int8",
    "uint8": "uint8",
    "bool": "bool",
}
_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]+(/[A-Za-z0-9_.\-]+)*$")
CHUNK_DIR = "c"
"""zarr v3 default chunk key encoding: every chunk file of an array lives under ``<array>/c/``."""


def dtype_name(dtype: torch.dtype) -> str:
    """'torch.float32' -> 'float32', refusing dtypes the format cannot hold."""
    name = str(dtype).removeprefix("torch.")
    if name not in _ZARR_DTYPE:
        raise CheckpointError(f"dtype {name} cannot be checkpointed; supported: {sorted(_ZARR_DTYPE)}")
    return name


def torch_dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def check_tensor_name(name: str) -> None:
    """Tensor names become zarr paths: 'model/layers.0.w' is array 'layers.0.w' in group 'model'."""
    if not _NAME_RE.match(name) or any(part in (".", "..") or part.startswith(".") for part in name.split("/")):
        raise CheckpointError(
            f"tensor name {name!r} is not a valid checkpoint path: use letters, digits, '_', '-', '.', "
            f"separated by '/', no empty parts and no part starting with '.'"
        )


@dataclass(frozen=True)
class Grid:
    """Chunk geometry of one logical tensor: regular chunks of `chunk_rows` rows along dim 0."""

    shape: tuple[int, ...]
    itemsize: int
    chunk_rows: int

    @staticmethod
    def for_shape(shape: tuple[int, ...], itemsize: int, chunk_bytes: int) -> "Grid":
        if len(shape) == 0:
            return Grid(shape, itemsize, 1)
        row_bytes = max(1, math.prod(shape[1:]) * itemsize)
        rows = max(1, chunk_bytes // row_bytes)
        return Grid(shape, itemsize, max(1, min(rows, shape[0])))

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def row_elems(self) -> int:
        return math.prod(self.shape[1:]) if self.shape else 1

    @property
    def chunk_elems(self) -> int:
        return self.chunk_rows * self.row_elems

    @property
    def n_chunks(self) -> int:
        if self.numel == 0:
            return 0
        return 1 if not self.shape else math.ceil(self.shape[0] / self.chunk_rows)

    def chunk_range(self, c: int) -> tuple[int, int]:
        """Flat element range [start, stop) of the real (unpadded) data of chunk c."""
        start = c * self.chunk_elems
        return start, min(self.numel, start + self.chunk_elems)

    @property
    def chunk_nbytes(self) -> int:
        """Bytes of every chunk file: zarr v3 stores edge chunks padded to the full chunk shape."""
        return self.chunk_elems * self.itemsize

    def chunk_key(self, c: int) -> str:
        if not self.shape:
            return CHUNK_DIR
        return f"{CHUNK_DIR}/" + "/".join([str(c)] + ["0"] * (len(self.shape) - 1))

    def chunks_overlapping(self, start: int, stop: int) -> range:
        if stop <= start or self.chunk_elems == 0:
            return range(0)
        return range(start // self.chunk_elems, (stop - 1) // self.chunk_elems + 1)

    def chunk_shape(self) -> list[int]:
        return [] if not self.shape else [self.chunk_rows, *self.shape[1:]]


def array_metadata(shape: tuple[int, ...], dtype: str, grid: Grid) -> dict:
    """The zarr v3 `zarr.json` of one array."""
    zdtype = _ZARR_DTYPE[dtype]
    bytes_codec: dict = {"name": "bytes"}
    if grid.itemsize > 1:
        bytes_codec["configuration"] = {"endian": "little"}
    return {
        "zarr_format": 3,
        "node_type": "array",
        "shape": list(shape),
        "data_type": zdtype,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": grid.chunk_shape()}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
        "fill_value": False if zdtype == "bool" else (0.0 if zdtype.startswith("float") else 0),
        "codecs": [bytes_codec],
        "attributes": {"torch_dtype": dtype},
        "storage_transformers": [],
    }


def group_metadata(attributes: dict | None = None) -> dict:
    return {"zarr_format": 3, "node_type": "group", "attributes": attributes or {}}


def group_paths(names: list[str]) -> list[str]:
    """Every intermediate group path ('' is the root) implied by the tensor names."""
    groups = {""}
    for name in names:
        parts = name.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            groups.add("/".join(parts[:i]))
    return sorted(groups)


def chunk_files(ckpt_dir: Path) -> list[Path]:
    """Every chunk file of the checkpoint directory ``ckpt_dir`` (files under a CHUNK_DIR), sorted; no metadata."""
    return sorted(p for p in ckpt_dir.rglob("*") if p.is_file() and CHUNK_DIR in p.relative_to(ckpt_dir).parts)


# ----------------------------------------------------------------------------------------------- raw file I/O


_MEMORY_FS = {0x01021994: "tmpfs", 0x858458F6: "ramfs"}  # statfs f_type magic numbers (linux/magic.h)
_memory_cache: dict[str, bool] = {}
_fsync_pool: ThreadPoolExecutor | None = None
_fsync_lock = threading.Lock()
_WRITE_PIECE = 1 << 20  # write_file checksums and writes this much at a time


def is_memory_fs(path: str | Path) -> bool:
    """True if `path` (or its nearest existing ancestor) lives on tmpfs/ramfs: node memory, where fsync means
    nothing and files can serve as staging buffers. Cached per path; False when it cannot be determined."""
    key = str(path)
    if key in _memory_cache:
        return _memory_cache[key]
    probe = Path(path).absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    f_type = _statfs_type(probe)
    result = f_type in _MEMORY_FS
    _memory_cache[key] = result
    return result


def _statfs_type(path: Path) -> int | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        buf = ctypes.create_string_buffer(256)  # struct statfs starts with f_type (a long on Linux)
        if libc.statfs(os.fsencode(str(path)), buf) != 0:
            return None
        return ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF
    except (OSError, AttributeError):
        return None


def fsync_many(files: list[Path], dirs: list[Path]) -> None:
    """fsync files and directories, several at a time and in one batch: the disk sees concurrent requests (one
    journal commit serves many of them) instead of one round trip per file. Raises the first OSError."""
    global _fsync_pool
    if len(files) + len(dirs) <= 2:
        for f in files:
            fsync_path(f)
        for d in dirs:
            fsync_dir(d)
        return
    with _fsync_lock:
        if _fsync_pool is None:
            _fsync_pool = ThreadPoolExecutor(8, thread_name_prefix="ckpt-fsync")
    futures = [_fsync_pool.submit(fsync_path, f) for f in files] + [_fsync_pool.submit(fsync_dir, d) for d in dirs]
    for fut in futures:
        fut.result()


def fsync_dir(path: Path) -> None:
    """fsync a directory so a rename or file creation inside it survives a power loss."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(
    path: Path, parts: list[memoryview], fsync: bool, crcs: ChunkCrcs | None = None, direct: bool = False
) -> ChunkCrcs:
    """Write the byte views to `path` (created/truncated), return the checksums of everything written, whole and
    per block (`crcs`: the caller already checksummed exactly these bytes). Checksummed piece by piece right before
    each piece is written, so it is in cache for the write and the checksum covers the bytes as they were written.
    direct=True: aligned runs bypass the page cache (direct_io.py; the level's file system accepted O_DIRECT)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    acc = BlockChecksummer() if crcs is None else None
    try:
        direct_fd = os.open(path, os.O_WRONLY | direct_io.O_DIRECT) if direct else -1
        try:
            direct_io.write_parts(fd, direct_fd, parts, _WRITE_PIECE, None if acc is None else acc.update)
        finally:
            if direct_fd >= 0:
                os.close(direct_fd)
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)
    return crcs if acc is None else acc.result()


def write_json_atomic(path: Path, obj: dict, fsync: bool = True) -> int:
    """Write JSON to a temp name, fsync, rename over `path`, fsync the directory; return its crc32c."""
    return write_bytes_atomic(path, json.dumps(obj, sort_keys=True, separators=(",", ":")).encode(), fsync)


def write_bytes_atomic(path: Path, data: bytes, fsync: bool = True) -> int:
    """Write bytes to a temp name, fsync, rename over `path`, fsync the directory; return their crc32c."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    crc = write_file(tmp, [memoryview(data)], fsync).crc32c
    os.replace(tmp, path)
    if fsync:
        fsync_dir(path.parent)
    return crc


def read_into(path: Path, views: list[memoryview]) -> tuple[int, int]:
    """Fill the views from the file in order; return (crc32c of the whole file, file size).

    Reads the file to its end (past the views) so the checksum covers padding too."""
    crc = 0
    total = 0
    with open(path, "rb", buffering=0) as f:
        for view in views:
            got = 0
            while got < len(view):
                n = f.readinto(view[got:])
                if not n:
                    return crc32c.crc32c(view[:got], crc), total + got
                got += n
            crc = crc32c.crc32c(view, crc)
            total += got
        while tail := f.read(1 << 20):
            crc = crc32c.crc32c(tail, crc)
            total += len(tail)
    return crc, total


def pread_span(path: Path, start: int, views: list[memoryview]) -> int:
    """Fill the views in order with the file's bytes from offset `start` on (one preadv); return the file's size.
    Views past the end of a shorter file are left partly unfilled: the caller compares the size to what it expects.
    Nothing is checksummed here (reshard.read_blocks verifies each block it asked for)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        want = sum(len(v) for v in views)
        got = 0
        while got < want and start + got < size:
            n = os.preadv(fd, _skip(views, got), start + got)
            if not n:
                break
            got += n
    finally:
        os.close(fd)
    return size


def _skip(views: list[memoryview], nbytes: int) -> list[memoryview]:
    """The views without their first `nbytes` bytes (to continue a short read)."""
    out = []
    for view in views:
        if nbytes >= len(view):
            nbytes -= len(view)
            continue
        out.append(view[nbytes:])
        nbytes = 0
    return out
