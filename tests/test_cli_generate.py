"""``utuning generate``: the CLI prints what the Python API generates, one JSON line per prompt."""

from __future__ import annotations

import json

from tests.test_generate import gpt2_recipe
from utuning.backbones.hf_decoder import HFDecoderBackbone
from utuning.cli import main
from utuning.generate import generate


def test_generate_command_prints_the_api_output(tmp_path, capsys):
    recipe = gpt2_recipe(tmp_path)
    code = main(["generate", str(recipe), "--prompt", "the cat", "--prompt", "hello", "--max-new-tokens", "4"])
    out = capsys.readouterr()
    assert code == 0, out.err
    lines = [json.loads(line) for line in out.out.splitlines()]
    backbone = HFDecoderBackbone.create(model=str(tmp_path / "model"), pretrained=True)
    expected = generate(backbone, backbone.tokenizer, ["the cat", "hello"], max_new_tokens=4)
    assert [r["prompt"] for r in lines] == ["the cat", "hello"] and [r["completion"] for r in lines] == expected
    code = main(["generate", "--prompt", "x"])
    assert code == 2 and "needs a recipe, a checkpoint, or both" in capsys.readouterr().err
