"""Shared fixtures: a tiny config on a small private corpus (helpers live in tests/support)."""

from __future__ import annotations

from pathlib import Path

import pytest

from support.configs import tiny_config_dict, write_text_corpus


@pytest.fixture(scope="session")
def text_corpus(tmp_path_factory) -> dict[str, Path]:
    """Three small text domains (prose, python, c) made from this machine's Python, written once per session."""
    return write_text_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture
def tiny_raw(text_corpus, tmp_path) -> dict:
    """A raw config dict for a tiny model on the small corpus; tests tweak it before building a Config."""
    return tiny_config_dict(text_corpus, tmp_path)


@pytest.fixture(scope="session")
def hf_tokenizer_dir(tmp_path_factory) -> Path:
    """A 512-id BPE tokenizer trained on the builtin corpus and saved with save_pretrained (once per session)."""
    from support.hf_tokenizer import save_bpe_tokenizer

    return save_bpe_tokenizer(tmp_path_factory.mktemp("bpe"))


@pytest.fixture(scope="module")
def s3_server_module(tmp_path_factory):
    from support.s3 import start_s3_server

    server = start_s3_server(tmp_path_factory.mktemp("s3"))
    yield server
    server.stop()


@pytest.fixture
def s3_server(s3_server_module):
    """A real SeaweedFS S3 server on free 127.0.0.1 ports (any key accepted), bucket "ckpt", shared by a module's
    tests (each uses its own key prefix) and running again if a test killed it."""
    if s3_server_module.proc.poll() is not None:
        s3_server_module.start()
    return s3_server_module
