"""elastic.warnings_once: a third-party warning raised on every call is shown once (by rank 0), ours every time.

The third-party module is a real module file imported from a temporary directory; it warns the way torch's
deprecated collectives do under DeepSpeed: on every call, with the warning filters changing in between (which
makes Python forget what it already showed).
"""

from __future__ import annotations

import importlib
import logging
import sys
import warnings
from pathlib import Path

import pytest

import elastic.trainer
from elastic import warnings_once

CALLS = 20
THIRD_PARTY_SOURCE = """
import warnings


def deprecated_collective():
    with warnings.catch_warnings():      # DeepSpeed and torch do this all the time: it resets "already shown"
        pass
    warnings.warn("`all_gather_into_tensor` is deprecated", FutureWarning, stacklevel=1)
"""


@pytest.fixture
def third_party(tmp_path, monkeypatch):
    (tmp_path / "some_lib.py").write_text(THIRD_PARTY_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("some_lib")
    yield module
    sys.modules.pop("some_lib", None)


@pytest.fixture
def hooked(monkeypatch):
    """Install on a clean showwarning, under the default filters (pytest records warnings otherwise)."""

    def install(rank: int) -> warnings_once.WarningsOnce:
        monkeypatch.setattr(warnings, "showwarning", warnings._showwarning_orig)
        return warnings_once.install(rank)

    with warnings.catch_warnings():
        warnings.resetwarnings()
        warnings.simplefilter("default")
        yield install


def _own_warning() -> None:
    """A warning raised from one of ecpt's own source files, as the trainer would raise it."""
    warnings.warn_explicit(
        "our own warning", UserWarning, elastic.trainer.__file__, 1, module="elastic.trainer", registry={}
    )


def _lines(caplog, logger: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == logger]


def test_without_the_hook_python_shows_it_on_every_call(third_party, hooked, monkeypatch):
    """The premise: Python's own once-per-location rule does not hold this warning back."""
    shown = []
    monkeypatch.setattr(warnings, "showwarning", lambda *args, **kwargs: shown.append(args))
    for _ in range(CALLS):
        third_party.deprecated_collective()
    assert len(shown) == CALLS


def test_third_party_warning_repeated_on_every_call_is_shown_once_by_rank_0(third_party, hooked, caplog):
    hooked(rank=0)
    with caplog.at_level(logging.DEBUG):
        for _ in range(CALLS):
            third_party.deprecated_collective()
    shown = _lines(caplog, "py.warnings")
    assert len(shown) == 1, shown
    assert "some_lib.py" in shown[0] and "FutureWarning: `all_gather_into_tensor` is deprecated" in shown[0]


def test_other_ranks_show_no_third_party_warning_and_log_it_once_at_debug(third_party, hooked, caplog):
    hooked(rank=1)
    with caplog.at_level(logging.DEBUG):
        for _ in range(CALLS):
            third_party.deprecated_collective()
    assert _lines(caplog, "py.warnings") == []
    hidden = [r for r in caplog.records if r.name == "ecpt.warnings"]
    assert len(hidden) == 1 and hidden[0].levelno == logging.DEBUG
    assert "all_gather_into_tensor" in hidden[0].getMessage()


def test_distinct_third_party_warnings_are_each_shown_once(hooked, caplog):
    hooked(rank=0)
    with caplog.at_level(logging.DEBUG):
        for i in range(CALLS):
            warnings.warn_explicit(f"message {i % 3}", FutureWarning, "/elsewhere/lib.py", 7, registry={})
            warnings.warn_explicit(f"message {i % 3}", DeprecationWarning, "/elsewhere/lib.py", 7, registry={})
    shown = _lines(caplog, "py.warnings")
    assert len(shown) == 6, shown
    assert len(set(shown)) == 6


@pytest.mark.parametrize("rank", [0, 1])
def test_our_own_warnings_are_shown_every_time_on_every_rank(hooked, caplog, rank):
    hooked(rank=rank)
    with caplog.at_level(logging.DEBUG):
        for _ in range(CALLS):
            _own_warning()
    shown = _lines(caplog, "py.warnings")
    assert len(shown) == CALLS
    assert all("UserWarning: our own warning" in line for line in shown)


def test_a_warning_sent_to_a_file_goes_to_that_file(tmp_path, caplog):
    written = []
    hook = warnings_once.WarningsOnce(0, to_file=lambda *args: written.append(args))
    target = tmp_path / "warnings.txt"
    with open(target, "w") as f, caplog.at_level(logging.DEBUG):
        hook("to the file", UserWarning, "/elsewhere/lib.py", 3, file=f)
    assert written == [("to the file", UserWarning, "/elsewhere/lib.py", 3, f, None)]
    assert _lines(caplog, "py.warnings") == []


def test_install_is_idempotent_and_follows_the_rank(hooked):
    first = hooked(rank=1)
    again = warnings_once.install(0)
    assert again is first and warnings.showwarning is first and first.rank == 0


def test_only_ecpt_packages_count_as_own():
    root = Path(elastic.trainer.__file__).resolve().parent.parent
    assert warnings_once.is_own_source(str(root / "elastic" / "trainer.py"))
    assert warnings_once.is_own_source(str(root / "checkpointing" / "manager.py"))
    assert warnings_once.is_own_source(str(root / "launch" / "cli.py"))
    assert not warnings_once.is_own_source(warnings.__file__)
    assert not warnings_once.is_own_source(str(root / "tests" / "unit" / "test_warnings_once.py"))
