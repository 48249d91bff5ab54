"""Chunk checksums: the crc32c of every fixed-size block of a chunk, and of the whole chunk, in one pass.

A load that needs only part of a chunk (a rank's ZeRO range ending inside it) reads and verifies only the blocks
covering that part, so each chunk record carries one crc32c per block besides the whole chunk's. Both come from
the same pass over the bytes: each block is checksummed on its own, and the whole chunk's crc32c is folded from
the block crcs (crc32c(A + B) = shift(crc32c(A), len(B)) ^ crc32c(B), the GF(2) algebra of zlib's crc32_combine),
so the whole-chunk value is exactly the one recorded before block checksums existed.

Block size: 256 KiB. A partial read costs at most one block more than needed at each end of the range: 256 KiB is
1.6% of a 16 MiB chunk and about 6% of the smallest per-rank pieces the reshard benchmark loads (a third of a
4 MiB tensor), where 1 MiB blocks would read 1.5x the bytes of such a tensor. The records stay small: a block's crc
is 8 hex digits, 512 characters per 16 MiB chunk (32 bytes of manifest per MiB of data), and checksumming in
256 KiB pieces runs at the same speed as in 1 MiB pieces (the per-block fold is a few table look-ups, about 1% of
the block's crc time). The size is recorded in every manifest (`crc_block_bytes`): readers never assume it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from functools import lru_cache

import crc32c

CRC_BLOCK_BYTES = 256 << 10
"""Bytes per checksummed block in the chunks this version writes (a chunk's last block may be shorter)."""
_POLY = 0x82F63B78  # crc32c (Castagnoli), bit-reflected


@dataclass(frozen=True)
class ChunkCrcs:
    """The checksums of one chunk's bytes."""

    crc32c: int
    """crc32c of the whole chunk (padding included), as recorded before block checksums existed."""
    blocks: str
    """crc32c of each block of `block_bytes` bytes, in order: 8 lowercase hex digits per block ("" when unknown)."""


def n_blocks(nbytes: int, block_bytes: int) -> int:
    return -(-nbytes // block_bytes)


def block_crc(blocks: str, i: int) -> int:
    """The crc32c of block i from a record's hex block list; ValueError when the list is malformed."""
    text = blocks[8 * i : 8 * i + 8]
    if len(text) != 8:
        raise ValueError(f"no crc for block {i} ({len(blocks) // 8} listed)")
    return int(text, 16)


class BlockChecksummer:
    """Accumulates a chunk's bytes, in pieces of any size, into its block crcs and whole crc (see ChunkCrcs)."""

    def __init__(self, block_bytes: int = CRC_BLOCK_BYTES) -> None:
        self.block_bytes = block_bytes
        self._crcs: list[int] = []
        self._fill = 0  # bytes of the current (unfinished) block seen so far
        self._partial = 0  # their crc32c

    def update(self, view: memoryview) -> None:
        pos, n = 0, len(view)
        while pos < n:
            take = min(n - pos, self.block_bytes - self._fill)
            self._partial = crc32c.crc32c(view[pos : pos + take], self._partial)
            self._fill += take
            pos += take
            if self._fill == self.block_bytes:
                self._crcs.append(self._partial)
                self._fill = self._partial = 0

    def result(self) -> ChunkCrcs:
        crcs = self._crcs + ([self._partial] if self._fill else [])
        return fold_blocks(crcs, self._fill, self.block_bytes)


def checksum(parts: list[memoryview], block_bytes: int = CRC_BLOCK_BYTES) -> ChunkCrcs:
    """The checksums of the concatenated parts (one pass)."""
    acc = BlockChecksummer(block_bytes)
    for part in parts:
        acc.update(part)
    return acc.result()


def checksum_buffer(view: memoryview, block_bytes: int = CRC_BLOCK_BYTES) -> ChunkCrcs:
    """The checksums of one contiguous buffer: one crc32c call per block (each releases the GIL), no piece loop.
    The persist thread checksums every staged chunk of every save with this, so its Python cost is per block."""
    n = len(view)
    crcs = [crc32c.crc32c(view[pos : pos + block_bytes]) for pos in range(0, n, block_bytes)]
    return fold_blocks(crcs, n % block_bytes, block_bytes)


def fold_blocks(crcs: list[int], fill: int, block_bytes: int) -> ChunkCrcs:
    """A chunk's checksums from its block crcs; `fill`: bytes in the last block when it is partial, else 0."""
    whole, shift_full = 0, _shifter(block_bytes)
    for crc in crcs[:-1] if fill else crcs:
        whole = shift_full(whole) ^ crc
    if fill:
        # shifting 0 gives 0: a chunk of one block (most small tensors) needs no multiply
        whole = (_shift_partial(whole, fill) if whole else 0) ^ crcs[-1]
    return ChunkCrcs(whole, struct.pack(f">{len(crcs)}I", *crcs).hex())


# -------------------------------------------------------------------- crc32c algebra (after zlib's crc32.c)


def _multmodp(a: int, b: int) -> int:
    """a * b modulo the crc polynomial (bit-reflected: bit 31 is x^0)."""
    m, p = 1 << 31, 0
    while True:
        if a & m:
            p ^= b
            if (a & (m - 1)) == 0:
                return p
        m >>= 1
        b = (b >> 1) ^ _POLY if b & 1 else b >> 1


def _squares() -> list[int]:
    """x^(2^k) modulo the polynomial for k = 0..63."""
    power, out = 1 << 30, []  # x^1
    for _ in range(64):
        out.append(power)
        power = _multmodp(power, power)
    return out


_X2K = _squares()


@lru_cache(maxsize=64)
def _x8nmodp(n: int) -> int:
    """x^(8n) modulo the polynomial: appending n zero bytes multiplies a crc by this."""
    p, k = 1 << 31, 3  # x^0; a byte is x^(2^3)
    while n:
        if n & 1:
            p = _multmodp(_X2K[k], p)
        n >>= 1
        k += 1
    return p


def _shift(crc: int, nbytes: int) -> int:
    """The crc of some bytes A -> the crc's contribution to crc32c(A + B) for a B of nbytes bytes."""
    return _multmodp(_x8nmodp(nbytes), crc)


_partial_sizes_seen: set[int] = set()


def _shift_partial(crc: int, nbytes: int) -> int:
    """_shift for a chunk's partial last block. The first chunk with a partial block of this size pays the
    pure-Python multiply (a few microseconds); from the second on, the tables of _shifter (built once, a few
    milliseconds) make it four look-ups: a training run checksums the same chunk sizes every save, while a one-off
    save of many shapes never builds tables it will not reuse."""
    if nbytes in _partial_sizes_seen:
        return _shifter(nbytes)(crc)
    _partial_sizes_seen.add(nbytes)
    return _shift(crc, nbytes)


@lru_cache(maxsize=64)  # 4 x 256 ints per size, about 36 KB
def _shifter(nbytes: int):
    """_shift(., nbytes) as four byte-indexed tables: a fold per block costs four look-ups, not 32 Python steps."""
    x = _x8nmodp(nbytes)
    t0, t1, t2, t3 = ([_multmodp(x, v << (8 * k)) for v in range(256)] for k in range(4))
    return lambda crc: t0[crc & 255] ^ t1[(crc >> 8) & 255] ^ t2[(crc >> 16) & 255] ^ t3[crc >> 24]
