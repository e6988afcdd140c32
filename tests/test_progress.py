"""Progress off a terminal: plain lines at a bounded rate, never carriage returns."""

import io

import pytest
import torch
from _trainer_toy import make_trainer

from speechlm.progress import progress_bar


def test_off_a_terminal_a_bar_prints_its_first_and_last_state_as_lines(monkeypatch):
    monkeypatch.setenv("SPEECHLM_PROGRESS_INTERVAL", "3600")
    log = io.StringIO()
    bar = progress_bar(total=1000, desc="synth", unit="utt", file=log)
    for step in range(1000):
        bar.update(1)
        bar.set_postfix(failed=step % 3)  # a new postfix does not force a line
    bar.close()
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue()
    assert len(lines) == 2
    assert lines[0].startswith("synth:   0%") and "0/1000" in lines[0]
    assert lines[1].startswith("synth: 100%") and "1000/1000" in lines[1] and "failed=0" in lines[1]


def test_off_a_terminal_the_interval_bounds_the_lines(monkeypatch):
    monkeypatch.setenv("SPEECHLM_PROGRESS_INTERVAL", "0")
    log = io.StringIO()
    with progress_bar(total=5, desc="generate", file=log) as bar:
        for _ in range(5):
            bar.update(1)
    lines = log.getvalue().splitlines()
    assert [line.split("|")[0] for line in lines] == [
        f"generate: {p:>3}%" for p in (0, 20, 40, 60, 80, 100)]


def test_a_closing_redraw_with_a_narrower_bar_is_not_a_new_line():
    from speechlm.progress import _LineWriter

    log = io.StringIO()
    writer = _LineWriter(log)
    # the same state twice; the rate got longer, so tqdm drew the bar one character narrower
    writer.write("\rgenerate: 100%|##########| 5/5 [00:00<00:00, 999.1it/s]")
    writer.write("\rgenerate: 100%|#########| 5/5 [00:00<00:00, 12345.6it/s]")
    writer.write("\rgenerate: 5it [00:00, 9.1it/s]")
    writer.write("\rgenerate: 5it [00:01, 4.9it/s]")  # no total: counts alone decide too
    assert len(log.getvalue().splitlines()) == 2


def test_on_a_terminal_the_bar_is_tqdm_as_usual():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    screen = Terminal()
    with progress_bar(total=3, desc="train", file=screen, mininterval=0) as bar:
        bar.update(3)
    assert "\r" in screen.getvalue()  # redrawn in place


def test_a_training_run_logs_readable_progress_lines(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SPEECHLM_PROGRESS_INTERVAL", "3600")
    torch.set_num_threads(1)
    make_trainer(tmp_path, max_steps=12, progress=True).fit()
    err = capsys.readouterr().err  # not a terminal, as under nohup or CI
    assert "\r" not in err
    lines = [line for line in err.splitlines() if line.startswith("train:")]
    assert len(lines) == 2 and "12/12" in lines[-1] and "loss=" in lines[-1]


if __name__ == "__main__":
    pytest.main([__file__])
