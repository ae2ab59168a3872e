"""Terminal output: tables on stdout, messages on stderr, only rank 0 speaks, quiet progress is lines."""

import pytest

from geoloc_cli import console


def test_tables_go_to_stdout_and_messages_to_stderr(capsys):
    console.table("metrics", ["name", "value"], [("acc", 0.5), ("n", 1200)])
    console.info("starting")
    console.warn("careful [not markup]")
    out, err = capsys.readouterr()
    assert "metrics" in out and "0.50" in out and "1,200" in out
    assert "starting" in err and "warning: careful [not markup]" in err and "starting" not in out


def test_only_rank_0_prints_but_every_rank_reports_errors(capsys, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    console.info("hidden")
    console.table("hidden", ["a"], [(1,)])
    console.error("rank 1 failed")
    out, err = capsys.readouterr()
    assert out == "" and "hidden" not in err and "error: rank 1 failed" in err


@pytest.mark.parametrize("quiet", [True, False])
def test_progress_without_a_terminal_is_plain_lines(capsys, quiet):
    console.set_quiet(quiet)
    try:
        with console.progress("epoch 1/1", 3, unit="step", loss="-") as bar:
            for _ in range(3):
                bar.advance(1, loss="0.5")
    finally:
        console.set_quiet(False)
    err = capsys.readouterr().err
    assert ("epoch 1/1: 3/3" in err and "loss=0.5" in err) != quiet  # quiet: not even the final line


def test_quiet_also_silences_the_libraries_progress_bars(monkeypatch):
    """-q: Hugging Face's and transformers' own tqdm bars go too (the README promises no bars)."""
    import os

    from huggingface_hub.utils import are_progress_bars_disabled

    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)  # (restored afterwards)
    monkeypatch.setitem(console._state, "quiet", False)
    console.set_quiet(True)
    assert are_progress_bars_disabled()
    assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"  # for spawned workers and later imports
