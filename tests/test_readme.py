"""The documented SpeechLM Python example (docs/python_api.md) runs as written (in a scratch
directory)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "docs" / "python_api.md"


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_speech_lm_example_trains_saves_reloads_and_generates(tmp_path, monkeypatch, capsys):
    [example] = [b for b in _python_blocks(README.read_text()) if "SpeechLMGenerator" in b]
    monkeypatch.chdir(tmp_path)
    exec(compile(example, "docs/python_api.md", "exec"), {"__name__": "readme_example"})
    printed = capsys.readouterr().out
    assert "trainable parameters" in printed
    assert printed.count("'task': 'asr'") == 1 and printed.count("'task': 'st'") == 1
    assert (tmp_path / "runs/my_speech_lm/speechlm_config.json").is_file()
