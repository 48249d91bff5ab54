"""The commit protocol's storage for an object-store level (root `s3://bucket/prefix`): see commit.py for the order.

Object stores have no rename and no directories, so a save is written in place under its final key prefix and
the manifest is the commit point:

    <prefix>/step-XXXXXXXX/<array>/c/<i>      chunks (same zarr v3 layout as every other level)
    <prefix>/step-XXXXXXXX/**/zarr.json       zarr metadata
    <prefix>/step-XXXXXXXX/manifest.json      put last, once every chunk of every rank is uploaded and verified
    <prefix>/latest                           {"step", "dir"}, put after the manifest (for people and tools)

A step prefix without manifest.json does not exist for readers (an upload in progress, or abandoned by a crash or a
lost server); the next retention after a commit deletes it. Retiring a step deletes its manifest first, so readers
stop trusting it before any chunk goes.

I/O goes through zarr's own store layer: zarr.storage.ObjectStore over an obstore S3Store (measured faster than
zarr.storage.FsspecStore with s3fs here: benchmarks/s3_stores.py). Chunks are uploaded `max_concurrency` at a time
from copies (the caller's buffers are reused at once), and obstore switches to multipart uploads for objects
above 5 MiB. Endpoint, region and credentials: LevelSpec.endpoint, else AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL; the
AWS_* variables, or, when boto3 is installed, boto3's chain (profiles, ~/.aws/config and credentials, SSO, IMDS).
Every store error becomes ObjectStoreError (an OSError), so the protocol reports it like a disk error: the save
fails on this level, older checkpoints stay intact, training continues.
"""

from __future__ import annotations

import json
import os
import re
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import crc32c

from checkpointing.checksums import BlockChecksummer, ChunkCrcs
from checkpointing.commit import LevelState, Target
from checkpointing.context import SaveContext
from checkpointing.errors import CheckpointCorruptError, CheckpointError
from checkpointing.manifest import MANIFEST_NAME, ChunkRecord, Manifest
from checkpointing.objclient import ObjectClient, ObjectStoreError
from checkpointing.reshard import corrupt_blocks, verify_record
from checkpointing.tiers import LevelSpec, step_dir_name

_STEP_RE = re.compile(r"^step-(\d{8,})$")
_CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "ExpiredToken", "InvalidToken"}


class ObjectStorage:
    """A level whose root is s3://bucket/prefix (see the module docstring). Used by one thread at a time: the
    persist thread, or the promoter thread while a promotion to this level is in flight.

    Locations (Target.location, final_location) are key prefixes relative to the bucket, as Paths."""

    def __init__(self, level: LevelSpec, max_concurrency: int = 4) -> None:
        self.level = level
        self.client = ObjectClient(level.root, level.endpoint)
        if not self.client.prefix:
            raise ValueError(f"LevelSpec {level.name}: {level.root!r} needs a key prefix: s3://bucket/prefix")
        self.root = Path(self.client.prefix)
        self.max_concurrency = max(1, max_concurrency)
        self._uploads = ThreadPoolExecutor(self.max_concurrency, thread_name_prefix=f"ckpt-upload-{level.name}")
        self._inflight: list[tuple[str, Future]] = []
        self._written: dict[str, int] = {}
        self._free: list[bytearray] = []
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------------------- naming and checks

    def key(self, location: Path, rel: str = "") -> str:
        return f"{location}/{rel}" if rel else str(location)

    def url(self, location: Path) -> str:
        return f"s3://{self.client.bucket}/{location}"

    def check(self) -> None:
        """Start-up: the bucket exists and the credentials may list, write and delete under the prefix. Raises
        CheckpointError saying which and what would fix it."""
        probe = self.key(self.root, f".ecpt-probe-{os.getpid()}-{threading.get_ident()}")
        where = f"{self.level.name} {self.level.root} (endpoint {self.client.endpoint or 'AWS S3'})"
        try:
            self.client.list_dir(str(self.root))
            self.client.put(probe, b"probe")
            self.client.delete(probe)
        except ObjectStoreError as e:
            text = str(e)
            if "NoSuchBucket" in text:
                raise CheckpointError(
                    f"{where}: bucket {self.client.bucket!r} does not exist ({text}); create it or fix the URL"
                ) from e
            if any(code in text for code in _CREDENTIAL_CODES):
                raise CheckpointError(
                    f"{where}: the S3 credentials were refused ({text}); set AWS_ACCESS_KEY_ID and "
                    f"AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, to a key that may read and write this bucket"
                ) from e
            raise CheckpointError(f"{where}: the object store cannot be used ({text})") from e

    # ------------------------------------------------------------------------------ commit protocol (writes)

    def begin(self, ctx: SaveContext, state: LevelState) -> Target:
        self._drain(raise_errors=False)  # normally nothing left: a failed save already waited and reported
        self._written = {}
        return Target(self.final_location(ctx.step), False)

    def prepare(self, target: Target, docs: list[tuple[str, bytes]]) -> list[str]:
        for rel, data in docs:
            key = self.key(target.location, rel)
            self.client.put(key, data)
            self._written[key] = len(data)
        return [rel for rel, _ in docs]

    def write_chunk(
        self, target: Target, rel: str, parts: list[memoryview], crcs: ChunkCrcs | None = None
    ) -> ChunkCrcs:
        """Copy the bytes (the caller reuses its buffers) and upload them in the background, at most
        max_concurrency at a time; the checksums (whole and per block) are taken from the copy unless `crcs` gives
        them. An earlier upload's failure raises here."""
        acc = BlockChecksummer() if crcs is None else None
        buf, view = self._reserve(sum(len(p) for p in parts))
        pos = 0
        for part in parts:
            view[pos : pos + len(part)] = part
            if acc is not None:
                acc.update(view[pos : pos + len(part)])
            pos += len(part)
        self._enqueue(target, rel, buf, view)
        return crcs if acc is None else acc.result()

    def link_chunk(self, target: Target, rel: str, src: str) -> None:
        """A staged file (zero-copy slot) becomes an object: its bytes are uploaded (already checksummed)."""
        with open(src, "rb", buffering=0) as f:
            buf, view = self._reserve(os.fstat(f.fileno()).st_size)
            got = f.readinto(view)
        if got != len(view):
            raise OSError(f"staging file {src}: read {got} of {len(view)} bytes")
        self._enqueue(target, rel, buf, view)

    def _reserve(self, size: int) -> tuple[bytearray, memoryview]:
        """An upload buffer of `size` bytes, once fewer than max_concurrency uploads are in flight."""
        while len(self._inflight) >= self.max_concurrency:
            self._finish(self._inflight.pop(0))
        buf = self._buffer(size)
        return buf, memoryview(buf)[:size]

    def _enqueue(self, target: Target, rel: str, buf: bytearray, view: memoryview) -> None:
        key = self.key(target.location, rel)
        self._written[key] = len(view)
        self._inflight.append((key, self._uploads.submit(self._upload, key, buf, view)))

    def make_durable(self, target: Target, rels: list[str]) -> None:
        """Every upload finished, and every listed object is in the store with its size (one listing)."""
        self._drain()
        listed = self.client.sizes(str(target.location))
        for rel in rels:
            key = self.key(target.location, rel)
            if listed.get(key) != self._written.get(key):
                raise ObjectStoreError(
                    f"{self.url(target.location)}/{rel}: after upload the store lists "
                    f"{listed.get(key)} bytes, {self._written.get(key)} were written"
                )

    def publish(self, target: Target, step: int, nonce: str, manifest: bytes) -> Path:
        """The commit: the manifest (every chunk of every rank is uploaded and verified), then `latest`."""
        self.client.put(self.key(target.location, MANIFEST_NAME), manifest)
        latest = json.dumps({"step": step, "dir": target.location.name}, sort_keys=True).encode()
        self.client.put(self.key(self.root, "latest"), latest)
        return target.location

    def retain(self, sig: str, nonce: str, state: LevelState, chunk_files: list[str] | None, others: bool) -> None:
        """Delete committed steps beyond keep_last (manifest first) and, with others=True, step prefixes that have
        no manifest and incomplete multipart uploads (saves abandoned by a crash or a failed upload; none is in
        flight: this level's saves run one at a time and this runs after this save's commit, when every rank's
        uploads have finished)."""
        steps = self._steps()
        committed = [(s, loc) for s, loc, has_manifest in steps if has_manifest]
        for _, loc in committed[: max(0, len(committed) - self.level.keep_last)]:
            if loc.name not in state.pinned:
                self._delete_step(loc)
        if others:
            for _, loc, has_manifest in steps:
                if not has_manifest:
                    self.client.delete_dir(str(loc))
            self.client.abort_multipart_uploads(str(self.root))

    def discard(self, target: Target, state: LevelState) -> None:
        """Delete the failed save's objects. Never raises (the protocol calls it on its error paths): when the
        store cannot be reached, the next retention after a commit removes them (no manifest: never read)."""
        self._drain(raise_errors=False)
        try:
            self.client.delete_dir(str(target.location))
        except ObjectStoreError:
            pass

    def final_location(self, step: int) -> Path:
        return self.root / step_dir_name(step)

    def retire_after(self, step: int, nonce: str) -> list[Path]:
        retired = []
        for s, loc in self.committed():
            if s > step:
                self._delete_step(loc)
                retired.append(loc)
        return retired

    # -------------------------------------------------------------------------------------------- reading

    def committed(self) -> list[tuple[int, Path]]:
        """(step, location) of every committed step (manifest present), oldest first."""
        return [(s, loc) for s, loc, has_manifest in self._steps() if has_manifest]

    def read_manifest(self, location: Path) -> Manifest:
        where = f"{self.url(location)}/{MANIFEST_NAME}"
        try:
            data = self.client.get(self.key(location, MANIFEST_NAME))
        except ObjectStoreError as e:
            raise CheckpointCorruptError(f"{where}: unreadable manifest ({e})") from e
        if data is None:
            raise CheckpointCorruptError(f"{where}: no committed manifest (an interrupted upload)")
        try:
            doc = json.loads(bytes(data))
        except ValueError as e:
            raise CheckpointCorruptError(f"{where}: unreadable manifest ({e})") from e
        return Manifest.from_json(doc, where)

    def read_chunk(self, path: Path, record: ChunkRecord, views: list[memoryview]) -> None:
        """Fill the views with the object's bytes after checking its size and crc32c against the manifest."""
        where = f"s3://{self.client.bucket}/{path}"
        try:
            data = self.client.get(str(path))
        except ObjectStoreError as e:
            raise CheckpointCorruptError(f"chunk {where}: unreadable ({e})") from e
        if data is None:
            raise CheckpointCorruptError(f"chunk {where}: missing (listed in the manifest)")
        data = memoryview(data).cast("B")
        crc = crc32c.crc32c(data)
        bad = corrupt_blocks(record, data) if crc != record.crc32c else None
        verify_record(Path(where), record, crc, len(data), bad)
        pos = 0
        for view in views:
            view[:] = data[pos : pos + len(view)]
            pos += len(view)

    def read_span(self, path: Path, start: int, views: list[memoryview]) -> int:
        """One ranged GET for the bytes the views hold from offset `start` on (reshard.read_blocks verifies each
        block); returns the object's size."""
        where = f"s3://{self.client.bucket}/{path}"
        want = sum(len(v) for v in views)
        try:
            got = self.client.get_range(str(path), start, start + want)
        except ObjectStoreError as e:
            raise CheckpointCorruptError(f"chunk {where}: unreadable ({e})") from e
        if got is None:
            raise CheckpointCorruptError(f"chunk {where}: missing (listed in the manifest)")
        data, size = got
        data = memoryview(data).cast("B")
        pos = 0
        for view in views:
            piece = data[pos : pos + len(view)]
            view[: len(piece)] = piece
            pos += len(view)
        return size

    def display(self, location: Path) -> str:
        return self.url(location)

    def close(self) -> None:
        self._drain(raise_errors=False)  # the save that wrote them already failed and said why
        self._uploads.shutdown(wait=True)

    # ------------------------------------------------------------------------------------------ internals

    def _steps(self) -> list[tuple[int, Path, bool]]:
        """(step, location, has manifest) of every step prefix under the root, oldest first (one listing)."""
        found = {}
        for key in self.client.sizes(str(self.root)):
            rel = key[len(str(self.root)) + 1 :] if str(self.root) != "." else key
            head, _, rest = rel.partition("/")
            m = _STEP_RE.match(head)
            if m and rest:
                entry = found.setdefault(int(m.group(1)), [self.root / head, False])
                entry[1] = entry[1] or rest == MANIFEST_NAME
        return [(s, loc, has) for s, (loc, has) in sorted(found.items())]

    def _delete_step(self, location: Path) -> None:
        self.client.delete(self.key(location, MANIFEST_NAME))  # readers stop trusting it first
        self.client.delete_dir(str(location))

    def _buffer(self, size: int) -> bytearray:
        with self._lock:
            for i, buf in enumerate(self._free):
                if len(buf) >= size:
                    return self._free.pop(i)
        return bytearray(size)

    def _upload(self, key: str, buf: bytearray, view: memoryview) -> None:
        try:
            self.client.put(key, view)
        finally:
            try:
                view.release()
                reusable = True
            except BufferError:  # something still holds the bytes: never hand them out again
                reusable = False
            with self._lock:
                if reusable and len(self._free) < self.max_concurrency + 1:
                    self._free.append(buf)

    def _finish(self, item: tuple[str, Future]) -> None:
        """Wait for one upload; on failure wait for the others too (nothing of this save keeps uploading), then
        raise."""
        try:
            item[1].result()
        except ObjectStoreError:
            self._drain()
            raise

    def _drain(self, raise_errors: bool = True) -> None:
        """Wait for every upload in flight; raise the first failure (raise_errors)."""
        first = None
        while self._inflight:
            _, fut = self._inflight.pop(0)
            try:
                fut.result()
            except ObjectStoreError as e:
                first = first or e
        if first is not None and raise_errors:
            raise first


def storage_for(level: LevelSpec, janitor=None, max_concurrency: int = 4):
    """The commit protocol's storage for a level: an object store for s3:// roots, else a directory tree."""
    if level.is_object:
        return ObjectStorage(level, max_concurrency)
    from checkpointing.commit_fs import FileStorage

    return FileStorage(level, janitor)
