"""``utuning generate``: the CLI prints what the Python API generates, one JSON line per prompt."""

from __future__ import annotations

import json

from tests.test_hf_decoder import tiny_decoder, tiny_tokenizer
from utuning.backbones.hf_decoder import HFDecoderBackbone
from utuning.cli import main
from utuning.generate import generate


def test_generate_command_prints_the_api_output(tmp_path, capsys):
    tok = tiny_tokenizer()
    hf = tiny_decoder("gpt2")
    hf.resize_token_embeddings(len(tok))
    hf.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""name: gen
backbone: {{name: hf_decoder, model: {tmp_path / 'model'}, pretrained: true}}
tuners: [{{name: lora, at: "blocks.*.attn.qkv", args: {{rank: 2, parts: [q, v]}}}}]
task: {{type: causal_lm}}
data: {{name: causal_lm, root: {tmp_path}}}
""")
    code = main(["generate", str(recipe), "--prompt", "the cat", "--prompt", "hello", "--max-new-tokens", "4"])
    out = capsys.readouterr()
    assert code == 0, out.err
    lines = [json.loads(line) for line in out.out.splitlines()]
    backbone = HFDecoderBackbone.create(model=str(tmp_path / "model"), pretrained=True)
    expected = generate(backbone, backbone.tokenizer, ["the cat", "hello"], max_new_tokens=4)
    assert [r["prompt"] for r in lines] == ["the cat", "hello"] and [r["completion"] for r in lines] == expected
    code = main(["generate", "--prompt", "x"])
    assert code == 2 and "needs a recipe, a checkpoint, or both" in capsys.readouterr().err
