"""The table of tuner cases every registered tuner must appear in (``test_tuner_table.py`` fails
when one is missing and not exempted below with a reason).

Each case is ``(specs, identity)`` on a tiny timm ViT (2 blocks, width 32, 32x32 images, 10
classes): ``identity`` says the specs start as the identity at their paper's initialisation. The
shared checks (``test_vision_tuners.py``, ``test_tuner_table.py``) attach every case, train it one
step, reload its state dict and, where every tuner is mergeable, merge and unmerge it.
"""

from __future__ import annotations

import pytest

SCALES = ("none", "scalar", "channel", "gate")
OP_SITES = {"attn": "blocks.*.attn", "mlp": "blocks.*.mlp", "block": "blocks.*"}
LINEARS = "blocks.*.*.*"  # every linear site: attn.qkv, attn.proj, mlp.fc1, mlp.fc2


def _case(id_, specs, identity):
    return pytest.param(specs, identity, id=id_)


# (specs, starts as the identity). Prompt-like tuners change attention from the first step.
CASES = [
    _case("prompt-embed-shallow", [("prompt", "embed", {"tokens": 3})], False),
    _case("prompt-block0-keep", [("prompt", "blocks.0", {"tokens": 3, "keep_outputs": True})], False),
    _case("prompt-deep", [("prompt", "blocks.*", {"tokens": 3, "dropout": 0.1})], False),
    _case("prefix", [("prefix", "blocks.*.attn", {"tokens": 3})], False),
    _case("prefix-mlp-reparam", [("prefix", "blocks.*.attn", {"tokens": 3, "reparam_hidden": 8})], False),
    _case("prefix-parallel-form", [("prefix", "blocks.*.attn", {"tokens": 3, "form": "parallel"})], False),
    _case("prompt_parallel", [("prompt_parallel", "blocks.*.attn", {"tokens": 3})], False),
    _case("lora-qkv-qv", [("lora", "blocks.*.attn.qkv", {"rank": 2, "parts": ["q", "v"]})], True),
    _case("lora-proj", [("lora", "blocks.*.attn.proj", {"rank": 2})], True),
    _case("lora-fc1-fc2", [("lora", ["blocks.*.mlp.fc1", "blocks.*.mlp.fc2"], {"rank": 2, "dropout": 0.1})], True),
    _case("bitfit-linear", [("bitfit", "blocks.*.*.*", {})], True),
    _case("ssf-linear", [("ssf", "blocks.{0..1}.attn.{qkv,proj}", {"init_std": 0.0})], True),
    _case("ssf-paper-init", [("ssf", "blocks.*.mlp.fc1", {})], False),
    _case("ia3-paper", [("ia3", "blocks.*.attn.qkv", {"parts": ["k", "v"]}),
                        ("ia3", "blocks.*.mlp.fc2", {"feedforward": True})], True),
    _case("ia3-proj", [("ia3", "blocks.*.attn.proj", {})], True),
    _case("linear_probe", [("linear_probe", "head", {})], True),
    _case("linear_probe-new-classes", [("linear_probe", "head", {"num_classes": 7})], False),
    _case("full-block0", [("full", "blocks.0", {})], True),
    _case("full-embed-norm-head", [("full", ["embed", "norm", "head"], {})], True),
    _case("full-linear", [("full", "blocks.1.mlp.fc2", {})], True),
    _case("full_finetune", [("full_finetune", "**", {})], True),
    _case("houlsby_adapter", [("houlsby_adapter", "blocks.*", {"hidden": 4})], True),
    _case("pfeiffer_adapter", [("pfeiffer_adapter", "blocks.*", {"hidden": 4})], True),
    _case("vpt_deep", [("vpt_deep", "blocks.*", {"tokens": 2})], False),
    _case("vpt_shallow", [("vpt_shallow", "embed", {"tokens": 2})], False),
    _case("dual_u_tuner", [("dual_u_tuner", "blocks.*", {"hidden": 4})], True),
    _case("tri_u_tuner-prefix", [("tri_u_tuner", "blocks.{0..1}", {"tuner": "p_prefix", "tokens": 2})], True),
    # Issue 14: the field's methods (G2).
    _case("vera", [("vera", LINEARS, {"rank": 4})], True),
    _case("vera-two-specs", [("vera", "blocks.*.attn.qkv", {"rank": 4, "projection_seed": 3}),
                             {"name": "vera", "at": "blocks.*.mlp.fc1", "args": {"rank": 2}, "key": "vera_mlp"}],
          True),
    _case("fact-tt", [("fact", LINEARS, {"rank": 4, "dropout": 0.0})], True),
    _case("fact-tk", [("fact", LINEARS, {"rank": 4, "form": "tk"})], True),
    _case("rep_adapter", [("rep_adapter", ["blocks.*.attn.qkv", "blocks.*.mlp.fc1"], {})], True),
    _case("adapter_plus", [("adapter_plus", "blocks.*.mlp", {"drop_path": 0.0})], False),
    _case("adapter_plus-zero", [("adapter_plus", "blocks.*.mlp", {"init": "zero", "drop_path": 0.0})], True),
    # GLoRA's b ⊙ D is dead here: timm initialises the frozen biases of this random ViT to zero
    # (test_methods_vision.py checks D on a model with biases).
    _case("glora", [("glora", LINEARS, {"d": "none"})], True),
    # A vector B on a LayerNorm'd input, or a constant E before a LayerNorm, would be dead too (the
    # norm removes them): the other kinds of each support.
    _case("glora-kinds", [("glora", LINEARS, {"a": "vector", "b": "lora", "c": "lora", "d": "none",
                                              "e": "vector"})], True),
    _case("glora-constant", [("glora", "blocks.*.attn.qkv", {"a": "constant", "b": "none", "c": "none",
                                                             "d": "none", "e": "none"})], True),
    _case("difffit", [("difffit", "blocks.*", {})], True),
    _case("lst", [("lst", "blocks.*", {"num_classes": 10, "reduction": 4})], True),
    _case("loreft", [("loreft", "blocks.*", {"rank": 2, "first": 1, "last": 2})], False),
    _case("adaption_prompt", [("adaption_prompt", "blocks.*.attn", {"tokens": 3})], True),
    # Composability: reparam tuners that transform the input and ones that read it on one layer
    # (merge folds the input transforms first), and issue 14's methods mixed across placements.
    _case("reparam-mix-fc2", [("lora", "blocks.*.mlp.fc2", {"rank": 2}), ("ia3", "blocks.*.mlp.fc2", {"feedforward": True}),
                              ("rep_adapter", "blocks.*.mlp.fc2", {}), ("ssf", "blocks.*.mlp.fc2", {"init_std": 0.0})],
          True),
    _case("issue14-mix", [("vera", "blocks.*.attn.qkv", {"rank": 4}), ("fact", "blocks.*.mlp.fc1", {"rank": 4, "form": "tk"}),
                          ("glora", "blocks.*.attn.proj", {"d": "none"}), ("rep_adapter", "blocks.*.attn.qkv", {}),
                          ("adapter_plus", "blocks.*.mlp", {"drop_path": 0.0, "init": "zero"}),
                          ("adaption_prompt", "blocks.*.attn", {"tokens": 2}), ("loreft", "blocks.1", {"rank": 2})],
          False),
    _case("bypass", [("bypass", "blocks.*", {"num_classes": 10, "hidden": 4})], True),
    _case("ytuning", [("ytuning", "blocks.*", {"num_labels": 10, "hidden": 16, "heads": 2})], False),
    # Added by other helpers of issue 14; their own tests check each method in depth.
    _case("dora", [("dora", LINEARS, {"rank": 2})], True),
    _case("loha", [("loha", LINEARS, {"rank": 2})], True),
    _case("lokr", [("lokr", LINEARS, {"rank": 2})], True),
    _case("oft", [("oft", LINEARS, {"block_size": 8})], True),
    _case("ln_tuning", [("ln_tuning", ["blocks.*.attn", "blocks.*.mlp", "norm"], {})], True),
    _case("convpass", [("convpass", ["blocks.*.attn", "blocks.*.mlp"], {"dropout": 0.0})], True),
]
for kind, at in OP_SITES.items():
    CASES += [
        _case(f"adapter-{kind}", [("adapter", at, {"hidden": 4, "dropout": 0.1})], True),
        _case(f"parallel_adapter-{kind}", [("parallel_adapter", at, {"hidden": 4, "layernorm": True})], True),
    ]
    for scale in SCALES:
        CASES += [
            _case(f"p_adapter-{kind}-{scale}", [("p_adapter", at, {"hidden": 4, "scale": scale})], True),
            _case(f"p_prefix-{kind}-{scale}", [("p_prefix", at, {"tokens": 3, "scale": scale})], True),
            # A zero scale makes p_prompt the identity; "none" and "gate" scales do not start at zero.
            _case(f"p_prompt-{kind}-{scale}", [("p_prompt", at, {"tokens": 3, "scale": scale})],
                  scale in ("scalar", "channel")),
        ]

#: Registered tuners and compositions with no case above, each with the reason. Keep it short:
#: a name here is a method the shared checks do not see.
EXEMPT: dict[str, str] = {
    "conv_lora": "attaches to convolution sites (ConvNeXt-like backbones); the ViT table has none",
    "embedding_lora": "reparam on embedding-table sites (text/decoder backbones); the ViT's embed site offers no "
                      "reparam placement",
}
