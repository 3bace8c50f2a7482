"""The README's Python examples run as written (weights swapped for random ones: no network)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from utuning.registry import TUNERS

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 2
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    monkeypatch.setattr(TUNERS, "_entries", dict(TUNERS._entries))  # the README registers scaled_bias: undo it
    for code in blocks:
        exec(compile(code.replace("pretrained=True", "pretrained=False"), str(README), "exec"), scope)
    model = scope["model"]
    assert Path("tuners.pt").is_file()
    assert set(torch.load("tuners.pt")) == set(model.tuner_state_dict())
    assert "scaled_bias" in scope["register_tuner"].__globals__["TUNERS"]
