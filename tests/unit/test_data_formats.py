"""Data formats and the Hugging Face tokenizer: JSONL, parquet, text and arrays tokenized into the cache, errors that
name the file and the line or row, and sources that cannot work rejected at validation."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer

from elastic.config import ConfigError, config_from_dict
from elastic.corpus_build import build_corpus
from elastic.data import Corpus


def _documents(text_corpus: dict[str, Path], domain: str) -> list[str]:
    return [p.read_text() for p in sorted(text_corpus[domain].glob("*.txt"))]


def _write_jsonl(path: Path, texts: list[str], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: t, "id": i}) + "\n" for i, t in enumerate(texts)))
    return path


def _write_parquet(path: Path, texts: list, column: str = "text") -> Path:
    pq.write_table(pa.table({column: pa.array(texts, type=pa.string()), "n": list(range(len(texts)))}), path)
    return path


def _hf_raw(tiny_raw: dict, tokenizer: Path) -> dict:
    raw = copy.deepcopy(tiny_raw)
    raw["data"]["tokenizer"] = f"hf:{tokenizer}"
    raw["model"]["vocab_size"] = 512
    return raw


def test_jsonl_parquet_and_text_with_an_hf_tokenizer(tiny_raw, text_corpus, hf_tokenizer_dir, tmp_path):
    raw = _hf_raw(tiny_raw, hf_tokenizer_dir)
    prose = _documents(text_corpus, "prose")
    raw["data"]["sources"]["prose"] = [str(_write_jsonl(tmp_path / "prose.jsonl", prose))]
    raw["data"]["sources"]["python"] = [
        str(_write_parquet(tmp_path / "python.parquet", _documents(text_corpus, "python")))
    ]
    raw["data"]["tokenize_workers"] = 2
    lines = []
    corpus = Corpus(config_from_dict(raw), root=build_corpus(config_from_dict(raw), log=lines.append))
    assert any("corpus: prose: 8 documents" in line for line in lines), lines
    tok = Tokenizer.from_file(str(hf_tokenizer_dir / "tokenizer.json"))
    eos = tok.token_to_id("<|endoftext|>")
    for domain, texts in (("prose", prose), ("python", _documents(text_corpus, "python"))):
        train, val = corpus.train[domain], corpus.val[domain]
        assert train.dtype == np.uint16 and val.dtype == np.uint16  # a 512-id vocabulary fits uint16
        expected = sum(len(tok.encode(t, add_special_tokens=False).ids) + 1 for t in texts)
        assert len(train) + len(val) == expected  # every document once, each followed by its EOS
        assert int((train == eos).sum() + (val == eos).sum()) == len(texts)
        assert train[-1] == eos and val[-1] == eos
    first_train = int(np.flatnonzero(np.asarray(corpus.train["prose"]) == eos)[0])
    assert tok.decode(corpus.train["prose"][:first_train].tolist()) in prose  # a whole document, round-tripped
    windows, domains = corpus.batch(0, 6)
    assert windows.shape == (6, 33) and windows.max() < 512 and set(domains) == {"prose"}


def test_a_vocabulary_smaller_than_the_tokenizer_is_rejected_at_validation(tiny_raw, hf_tokenizer_dir):
    raw = _hf_raw(tiny_raw, hf_tokenizer_dir)
    raw["model"]["vocab_size"] = 300
    with pytest.raises(ConfigError, match=r"model.vocab_size \(300\).*token ids up to 511.*at least 512"):
        config_from_dict(raw)


@pytest.mark.parametrize(
    "spec,message",
    [
        ("hf:meta-llama/Llama-3.2-1B", "Hugging Face Hub id.*download it first"),
        ("hf:/nonexistent/tokenizer", "does not exist"),
        ("sentencepiece", "must be 'auto', 'bytes' or 'hf:DIR'"),
    ],
)
def test_tokenizers_that_cannot_be_loaded_are_rejected(tiny_raw, spec, message):
    raw = copy.deepcopy(tiny_raw)
    raw["data"]["tokenizer"] = spec
    with pytest.raises(ConfigError, match=f"data.tokenizer.*{message}"):
        config_from_dict(raw)


def test_auto_tokenizer_of_a_model_without_one_is_rejected(tiny_raw, tmp_path):
    from support.hf_models import save_tiny_model

    model = save_tiny_model("llama", tmp_path / "no-tokenizer")
    raw = copy.deepcopy(tiny_raw)
    raw["model"] = {"init": f"hf:{model}", "seq_len": 32}
    with pytest.raises(
        ConfigError, match=r"data.tokenizer \('auto': model.init's tokenizer\) .* has no tokenizer.json"
    ):
        config_from_dict(raw)
    raw["data"]["tokenizer"] = "bytes"  # the way out the error names: 256 byte ids fit the model's 300
    assert config_from_dict(raw).model.vocab_size == 300


def test_auto_tokenizer_follows_model_init(hf_tokenizer_dir):
    from elastic.text_tokenizer import resolve_spec

    assert resolve_spec("auto", None) == "bytes"
    assert resolve_spec("auto", f"hf:{hf_tokenizer_dir}") == f"hf:{hf_tokenizer_dir}"
    assert resolve_spec("bytes", f"hf:{hf_tokenizer_dir}") == "bytes"


@pytest.mark.parametrize(
    "line,message",
    [
        ('{"text": "unterminated', "not valid JSON"),
        ('["a list"]', "expected a JSON object, got a JSON list"),
        ('{"body": "no text field"}', r"no field 'text' \(data.field\); its fields are \['body'\]"),
        ('{"text": 42}', "field 'text' is a int, not a string"),
    ],
)
def test_malformed_jsonl_names_the_file_and_line(tiny_raw, tmp_path, line, message):
    raw = copy.deepcopy(tiny_raw)
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "one"}\n\n{"text": "two"}\n' + line + "\n")  # the blank line 2 is skipped
    raw["data"]["sources"]["c"] = [str(path)]
    with pytest.raises(ConfigError, match=f"{path}, line 4: {message}"):
        build_corpus(config_from_dict(raw))


def test_parquet_errors_name_the_file_and_row(tiny_raw, tmp_path):
    raw = copy.deepcopy(tiny_raw)
    path = _write_parquet(tmp_path / "nulls.parquet", ["fine", "also fine", None, "never read"])
    raw["data"]["sources"]["c"] = [str(path)]
    with pytest.raises(ConfigError, match=f"{path}, row 2: column 'text' is null"):
        build_corpus(config_from_dict(raw))
    raw["data"]["field"] = "content"
    with pytest.raises(
        ConfigError, match=rf"{path}: no column 'content' \(data.field\); its columns are \['text', 'n'\]"
    ):
        build_corpus(config_from_dict(raw))
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    raw["data"]["sources"]["c"] = [str(tmp_path / "junk.parquet")]
    with pytest.raises(ConfigError, match="junk.parquet: not a readable parquet file"):
        build_corpus(config_from_dict(raw))


def test_a_source_matching_no_file_or_only_empty_files_fails_at_validation(tiny_raw, tmp_path):
    raw = copy.deepcopy(tiny_raw)
    raw["data"]["sources"]["c"] = [str(tmp_path / "absent" / "*.jsonl")]
    with pytest.raises(ConfigError, match=r"data.sources.c: .*absent/\*.jsonl' matches no file"):
        config_from_dict(raw)
    (tmp_path / "empty").mkdir()
    for name in ("a.txt", "b.jsonl"):
        (tmp_path / "empty" / name).write_text("")
    raw["data"]["sources"]["c"] = [str(tmp_path / "empty" / "*")]
    with pytest.raises(ConfigError, match=r"data.sources.c: .*empty/\*' holds only empty documents \(2 files\)"):
        config_from_dict(raw)


def test_files_with_only_empty_documents_fail_at_validation(tiny_raw, tmp_path):
    """Files with bytes but no text: JSONL lines and parquet rows whose text is empty."""
    raw = copy.deepcopy(tiny_raw)
    raw["data"]["sources"]["c"] = [str(_write_jsonl(tmp_path / "blank.jsonl", ["", "", ""]))]
    with pytest.raises(ConfigError, match="data.sources.c: .*blank.jsonl' holds only empty documents"):
        config_from_dict(raw)
    raw["data"]["sources"]["c"] = [str(_write_parquet(tmp_path / "blank.parquet", ["", ""]))]
    with pytest.raises(ConfigError, match="data.sources.c: .*blank.parquet' holds only empty documents"):
        config_from_dict(raw)


def test_a_malformed_first_line_is_reported_at_validation(tiny_raw, tmp_path):
    raw = copy.deepcopy(tiny_raw)
    path = tmp_path / "broken.jsonl"
    path.write_text("{not json\n")
    raw["data"]["sources"]["c"] = [str(path)]
    with pytest.raises(ConfigError, match=f"{path}, line 1: not valid JSON"):
        config_from_dict(raw)


def test_pretokenized_zarr_source(tiny_raw, tmp_path):
    import zarr

    raw = copy.deepcopy(tiny_raw)
    tokens = (np.arange(20_000) % 251).astype(np.uint16)
    array = zarr.create_array(str(tmp_path / "tok.zarr"), shape=tokens.shape, dtype="uint16", chunks=(4096,))
    array[:] = tokens
    raw["data"]["sources"]["c"] = [str(tmp_path / "tok.zarr")]
    corpus = Corpus(config_from_dict(raw))
    assert corpus.train["c"].dtype == np.uint16
    assert np.array_equal(corpus.train["c"], tokens[:16_000]) and np.array_equal(corpus.val["c"], tokens[16_000:])
