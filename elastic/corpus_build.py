"""Tokenizing the sources once into a cache of flat token arrays, safe against interruption and concurrent builders.

Layout: ``<data.cache_dir>/corpus-<key>/<domain>.{train,val}.bin`` (raw little-endian token ids, uint8 for bytes,
uint16 when the tokenizer's vocabulary fits, else uint32) and ``corpus.json`` (dtype, token and document counts).
The key hashes the tokenizer's content (tokenizer.json and the EOS token), the sources' identity (every matched
file's absolute path, size and modification time; builtin sources by name and the Python version), data.field and
data.val_fraction. Documents are joined with the tokenizer's EOS token (bytes: a blank line); a document goes to
validation by a hash of its name, so the split is the same on every machine.

A build writes into ``corpus-<key>.tmp-<pid>`` and publishes it with one ``rename``: an interrupted build never
leaves a directory that looks complete, and the next build (under the same file lock) removes its leftovers.
Text is tokenized by ``data.tokenize_workers`` processes with a progress bar (bytes read, documents, tokens/s, ETA).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import sys
import time
from collections import deque
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from tqdm import tqdm

from elastic.config import Config, ConfigError
from elastic.data_sources import (
    BUILTIN_MAX_BYTES,
    Document,
    builtin_documents,
    expand,
    is_token_array,
    open_token_array,
    read_documents,
    source_bytes,
    source_identity,
)
from elastic.text_tokenizer import BYTE_SEPARATOR, BYTES, TokenizerInfo, load_hf_tokenizer, resolve_spec, tokenizer_info

CORPUS_VERSION = 2
"""Bump when the cache layout or the extraction changes, so stale caches are rebuilt."""
CHUNK_BYTES = 1 << 20
"""Text per task sent to a tokenizer worker: large enough to amortise the inter-process copy."""
ARRAY_SLICE = 1 << 24
"""Tokens copied at a time from a pre-tokenized array (bounded memory)."""


def _is_validation(name: str, val_fraction: float) -> bool:
    bucket = int(hashlib.sha1(name.encode()).hexdigest()[:8], 16) % 10_000
    return bucket < val_fraction * 10_000


def data_tokenizer(cfg: Config) -> TokenizerInfo:
    return tokenizer_info(resolve_spec(cfg.data.tokenizer, getattr(cfg.model, "init", None)))


def cache_key(cfg: Config, info: TokenizerInfo) -> str:
    stamp = {
        "version": CORPUS_VERSION,
        "python": sys.version,
        "val_fraction": cfg.data.val_fraction,
        "cap": BUILTIN_MAX_BYTES,
        "field": cfg.data.field,
        "tokenizer": info.content_hash,
        "sources": {d: [source_identity(s) for s in srcs] for d, srcs in sorted(cfg.data.sources.items())},
    }
    return hashlib.sha1(json.dumps(stamp, sort_keys=True).encode()).hexdigest()[:16]


def corpus_dir(cfg: Config, info: TokenizerInfo | None = None) -> Path:
    key = cache_key(cfg, info or data_tokenizer(cfg))
    return Path(os.path.expanduser(cfg.data.cache_dir)) / f"corpus-{key}"


# ---------------------------------------------------------------------------------------------------------------
# Encoding: one function for in-process (bytes) and worker-process (Hugging Face) use.

_WORKER_TOKENIZER = None


def _init_worker(tokenizer_path: str) -> None:
    global _WORKER_TOKENIZER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker process: the processes are the parallelism
    _WORKER_TOKENIZER = load_hf_tokenizer(Path(tokenizer_path))


def _encode_chunk(texts: list, eos_id: int | None, dtype: str) -> list[np.ndarray]:
    """Token arrays of a chunk of documents, each followed by the EOS token (bytes: by a blank line)."""
    if eos_id is None:
        to_bytes = lambda t: t if isinstance(t, bytes) else t.encode()  # noqa: E731
        return [np.frombuffer(to_bytes(t) + BYTE_SEPARATOR, dtype=np.uint8) if t else None for t in texts]
    encode = getattr(_WORKER_TOKENIZER, "encode_batch_fast", _WORKER_TOKENIZER.encode_batch)
    out = []
    for text, enc in zip(texts, encode(texts, add_special_tokens=False)):
        out.append(np.array(enc.ids + [eos_id], dtype=dtype) if text and enc.ids else None)
    return out


class _DomainWriter:
    """Appends a domain's documents to its train and validation files; keeps the counts for corpus.json."""

    def __init__(self, tmp: Path, domain: str, dtype: np.dtype):
        self.paths = {s: tmp / f"{domain}.{s}.bin" for s in ("train", "val")}
        self.files = {s: open(p, "wb") for s, p in self.paths.items()}
        self.tokens = {"train": 0, "val": 0}
        self.documents = 0
        self.max_id = 0
        self.dtype = dtype
        self.last_train_doc = 0

    def add(self, tokens: np.ndarray, split: str, document: bool = True) -> None:
        self.files[split].write(np.ascontiguousarray(tokens, dtype=self.dtype).tobytes())
        self.tokens[split] += len(tokens)
        self.max_id = max(self.max_id, int(tokens.max(initial=0)))
        self.documents += document
        if split == "train":
            self.last_train_doc = len(tokens) if document else 0

    def close(self) -> dict:
        for f in self.files.values():
            f.close()
        if self.tokens["val"] == 0 and self.last_train_doc and self.documents > 1:
            # Tiny sources whose hash split held nothing out: the last document becomes validation.
            size = self.dtype.itemsize
            with open(self.paths["train"], "r+b") as f:
                f.seek(-self.last_train_doc * size, os.SEEK_END)
                tail = f.read()
                f.seek(-self.last_train_doc * size, os.SEEK_END)
                f.truncate()
            self.paths["val"].write_bytes(tail)
            self.tokens["train"] -= self.last_train_doc
            self.tokens["val"] += self.last_train_doc
        return {
            "dtype": self.dtype.name,
            "train_tokens": self.tokens["train"],
            "val_tokens": self.tokens["val"],
            "documents": self.documents,
            "max_id": self.max_id,
        }


def _text_chunks(docs, hf: bool, where: str):
    """Documents grouped into chunks of about CHUNK_BYTES: (texts, names, source bytes)."""
    texts, names, nbytes = [], [], 0
    for doc in docs:
        text = doc.text
        if hf and isinstance(text, bytes):
            try:
                text = text.decode("utf-8", errors="replace" if doc.name.startswith("builtin:") else "strict")
            except UnicodeDecodeError as exc:
                path = doc.name.split("\x00")[0]
                raise ConfigError(f"{where}: {path} is not UTF-8 text (byte {exc.start}); convert it") from exc
        texts.append(text)
        names.append(doc.name)
        nbytes += doc.source_bytes
        if nbytes >= CHUNK_BYTES:
            yield texts, names, nbytes
            texts, names, nbytes = [], [], 0
    if texts:
        yield texts, names, nbytes


def _source_documents(src: str, field: str, where: str):
    if src.startswith("builtin:"):
        name = src.removeprefix("builtin:")
        for doc in builtin_documents(name):
            yield Document(f"builtin:{doc.name}", doc.text, doc.source_bytes)
        return
    for path in expand(src, where):
        if not is_token_array(path):
            for doc in read_documents(path, src, field):
                yield Document(f"{path}\x00{doc.name}", doc.text, doc.source_bytes)


def _split_name(name: str) -> str:
    """The part of a document name the validation split hashes: relative to the source, not where data lives."""
    return name.split("\x00", 1)[-1].removeprefix("builtin:")


class _Builder:
    def __init__(self, cfg: Config, info: TokenizerInfo, tmp: Path, log):
        self.cfg, self.info, self.tmp, self.log = cfg, info, tmp, log
        self.hf = info.spec != BYTES
        self.workers = max(1, cfg.data.tokenize_workers or os.cpu_count() or 1)
        total = sum(source_bytes(s) for srcs in cfg.data.sources.values() for s in srcs)
        self.bar = tqdm(total=total, unit="B", unit_scale=True, desc="tokenizing", disable=None, file=sys.stderr)
        self.started, self.documents, self.tokens = time.monotonic(), 0, 0  # over all domains, for the bar
        self.pool = None
        if self.hf:
            path = info.spec.removeprefix("hf:")
            self.pool = get_context("fork").Pool(self.workers, _init_worker, (str(Path(path).expanduser()),))

    def close(self) -> None:
        self.bar.close()
        if self.pool:
            self.pool.terminate()
            self.pool.join()

    def domain(self, domain: str, sources: list[str]) -> dict:
        where = f"data.sources.{domain}"
        dtype = np.dtype(self.info.dtype)
        for src in sources:
            if not src.startswith("builtin:"):
                for path in expand(src, where):
                    if is_token_array(path):
                        dtype = np.promote_types(dtype, open_token_array(path, where).dtype)
        writer = _DomainWriter(self.tmp, domain, dtype)
        start = time.monotonic()
        try:
            for src in sources:
                before = writer.tokens["train"] + writer.tokens["val"]
                self._source(writer, src, where)
                if writer.tokens["train"] + writer.tokens["val"] == before:
                    raise ConfigError(f"{where}: {src!r} holds only empty documents; there is nothing to train on")
        finally:
            meta = writer.close()
        seconds = time.monotonic() - start
        tokens = meta["train_tokens"] + meta["val_tokens"]
        self.log(
            f"corpus: {domain}: {meta['documents']:,} documents, {meta['train_tokens']:,} train + "
            f"{meta['val_tokens']:,} validation tokens ({dtype.name}) in {seconds:.1f} s "
            f"({tokens / max(seconds, 1e-9) / 1e3:,.0f} k tokens/s, {self.workers if self.hf else 1} processes)"
        )
        return meta

    def _source(self, writer: _DomainWriter, src: str, where: str) -> None:
        if not src.startswith("builtin:"):
            for path in expand(src, where):
                if is_token_array(path):
                    self._array(writer, path, where)
        chunks = _text_chunks(_source_documents(src, self.cfg.data.field, where), self.hf, where)
        if self.pool is None:
            for texts, names, nbytes in chunks:
                self._write(writer, names, _encode_chunk(texts, None, "uint8"), nbytes)
            return
        pending = deque()
        for texts, names, nbytes in chunks:
            task = self.pool.apply_async(_encode_chunk, (texts, self.info.eos_id, writer.dtype.name))
            pending.append((names, task, nbytes))
            if len(pending) >= 2 * self.workers:  # bounded read-ahead: the sources may be far larger than memory
                self._write(writer, *self._result(pending.popleft()))
        while pending:
            self._write(writer, *self._result(pending.popleft()))

    @staticmethod
    def _result(item):
        names, task, nbytes = item
        return names, task.get(), nbytes

    def _write(self, writer: _DomainWriter, names, arrays, nbytes: int) -> None:
        for name, tokens in zip(names, arrays):
            if tokens is not None:
                writer.add(tokens, "val" if _is_validation(_split_name(name), self.cfg.data.val_fraction) else "train")
                self.documents += 1
                self.tokens += len(tokens)
        rate = self.tokens / max(time.monotonic() - self.started, 1e-9)
        self.bar.set_postfix(docs=f"{self.documents:,}", tokens_per_s=f"{rate:,.0f}", refresh=False)
        self.bar.update(nbytes)

    def _array(self, writer: _DomainWriter, path: Path, where: str) -> None:
        tokens = open_token_array(path, where)
        length = tokens.shape[0]  # zarr arrays have no len()
        cut = int(length * (1 - self.cfg.data.val_fraction))
        for split, lo, hi in (("train", 0, cut), ("val", cut, length)):
            for first in range(lo, hi, ARRAY_SLICE):
                part = np.asarray(tokens[first : min(first + ARRAY_SLICE, hi)])
                if int(part.max(initial=0)) >= self.cfg.model.vocab_size:
                    raise ConfigError(
                        f"{where}: {path} has token id {int(part.max())} but model.vocab_size is "
                        f"{self.cfg.model.vocab_size}; raise model.vocab_size or fix the array"
                    )
                writer.add(part, split, document=False)
        self.bar.update(path.stat().st_size if path.is_file() else 0)


def check_corpus(cfg: Config, meta: dict) -> None:
    """The cached corpus fits the model: enough tokens for a window in both splits, ids below model.vocab_size."""
    for domain in cfg.data.sources:
        m = meta["domains"][domain]
        if m["val_tokens"] <= cfg.model.seq_len + 1 or m["train_tokens"] <= cfg.model.seq_len + 1:
            raise ConfigError(
                f"data.sources.{domain}: only {m['train_tokens']} train / {m['val_tokens']} validation tokens, "
                f"fewer than model.seq_len + 2 = {cfg.model.seq_len + 2}; add more text"
            )
        if m["max_id"] >= cfg.model.vocab_size:
            raise ConfigError(
                f"data.sources.{domain}: token ids reach {m['max_id']} but model.vocab_size is "
                f"{cfg.model.vocab_size}; raise model.vocab_size"
            )


def load_meta(root: Path) -> dict:
    return json.loads((root / "corpus.json").read_text())


def build_corpus(cfg: Config, log=print) -> Path:
    """Tokenize every domain into ``<cache>/corpus-<key>/`` unless it is already there; returns that directory.

    A file lock makes concurrent builders (several launchers, several workers) wait for one build.
    """
    info = data_tokenizer(cfg)
    out = corpus_dir(cfg, info)
    if not (out / "corpus.json").is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out.parent / f"{out.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (out / "corpus.json").is_file():
                _build(cfg, info, out, log)
    check_corpus(cfg, load_meta(out))
    return out


def _build(cfg: Config, info: TokenizerInfo, out: Path, log) -> None:
    for stale in out.parent.glob(f"{out.name}.tmp-*"):  # an interrupted build's leftovers (we hold the lock)
        shutil.rmtree(stale, ignore_errors=True)
    tmp = out.parent / f"{out.name}.tmp-{os.getpid()}"
    tmp.mkdir()
    builder = _Builder(cfg, info, tmp, log)
    try:
        domains = {d: builder.domain(d, srcs) for d, srcs in cfg.data.sources.items()}
    finally:
        builder.close()
    meta = {"version": CORPUS_VERSION, "tokenizer": info.spec, "eos_id": info.eos_id, "domains": domains}
    (tmp / "corpus.json").write_text(json.dumps(meta, indent=2))
    for file in tmp.iterdir():  # durable before it becomes visible
        with open(file, "rb") as f:
            os.fsync(f.fileno())
    os.rename(tmp, out)
    log(f"corpus: tokenizer {info.spec}, cached in {out}")
