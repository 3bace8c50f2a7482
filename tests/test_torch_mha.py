"""nn.MultiheadAttention under the generic adapter: the re-written attention equals PyTorch's, and
q/k/v LoRA, prefix, p_prefix and side tuners work on an nn.TransformerEncoder."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import utuning
from tests.helpers import assert_only_tuner_grads, assert_state_round_trip, randomize_tuners
from utuning.backbones.torch_mha import TunedMultiheadAttention


class Holder(nn.Module):
    """One attention module, called as its users call it."""

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        self.attn = mha

    def forward(self, query, key, value, **kwargs):
        return self.attn(query, key, value, **kwargs)


class TinyEncoder(nn.Module):
    """Token ids -> embeddings -> 2-layer nn.TransformerEncoder (width 32) -> mean -> 3 classes."""

    def __init__(self, *, batch_first: bool = True, norm_first: bool = False) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.embed = nn.Embedding(50, 32)
        layer = nn.TransformerEncoderLayer(32, 2, 64, dropout=0.1, batch_first=batch_first, norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(32, 3)

    def forward(self, ids: torch.Tensor, padding: torch.Tensor | None = None) -> torch.Tensor:  # (B, N) -> (B, 3)
        x = self.embed(ids)
        x = x if self.batch_first else x.transpose(0, 1)
        h = self.encoder(x, src_key_padding_mask=padding)
        h = h if self.batch_first else h.transpose(0, 1)
        return self.head(h.mean(1))


IDS = torch.randint(0, 50, (3, 7), generator=torch.Generator().manual_seed(0))


def _encoder(**kwargs) -> TinyEncoder:
    torch.manual_seed(0)
    return TinyEncoder(**kwargs).eval()


MHA_CASES = {
    "batch-first": dict(batch_first=True),
    "sequence-first": dict(batch_first=False),
    "no-bias": dict(batch_first=True, bias=False),
    "kdim-vdim": dict(batch_first=True, kdim=12, vdim=10),
    "bias-kv-zero-attn": dict(batch_first=True, add_bias_kv=True, add_zero_attn=True),
}


@pytest.mark.parametrize("case", list(MHA_CASES))
def test_rewritten_attention_equals_pytorch(case):
    """Same outputs and weights as nn.MultiheadAttention (float64), with boolean and additive
    masks, key padding, cross-attention, unbatched inputs; the state-dict keys do not change."""
    kwargs = MHA_CASES[case]
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, **kwargs).double().eval()
    keys = list(mha.state_dict())
    tuned = utuning.wrap(Holder(copy.deepcopy(mha)), "generic").model
    assert isinstance(tuned.attn, TunedMultiheadAttention) and list(tuned.attn.state_dict()) == keys
    g = torch.Generator().manual_seed(1)
    b, n, s = 2, 5, 6
    shape = (lambda m: (b, m)) if kwargs["batch_first"] else (lambda m: (m, b))
    q = torch.randn(*shape(n), 16, generator=g, dtype=torch.float64)
    k = torch.randn(*shape(s), kwargs.get("kdim", 16), generator=g, dtype=torch.float64)
    v = torch.randn(*shape(s), kwargs.get("vdim", 16), generator=g, dtype=torch.float64)
    padding = torch.zeros(b, s, dtype=torch.bool)
    padding[0, -2:] = True
    causal = torch.ones(n, s, dtype=torch.bool).triu(1)
    additive = torch.randn(b * 4, n, s, generator=g, dtype=torch.float64)
    calls = [dict(), dict(key_padding_mask=padding), dict(attn_mask=causal, need_weights=False),
             dict(attn_mask=additive, average_attn_weights=False), dict(key_padding_mask=padding, attn_mask=causal)]
    with torch.no_grad():
        for call in calls:
            want, got = mha(q, k, v, **call), tuned(q, k, v, **call)
            torch.testing.assert_close(got[0], want[0], atol=1e-10, rtol=0)
            assert (got[1] is None) == (want[1] is None)
            if want[1] is not None:
                torch.testing.assert_close(got[1], want[1], atol=1e-10, rtol=0)
        if "kdim" not in kwargs:  # self-attention, batched and unbatched
            x = q
            torch.testing.assert_close(tuned(x, x, x)[0], mha(x, x, x)[0], atol=1e-10, rtol=0)
            x = q[:, 0] if not kwargs["batch_first"] else q[0]
            torch.testing.assert_close(tuned(x, x, x)[0], mha(x, x, x)[0], atol=1e-10, rtol=0)


def test_prefix_equals_pytorch_bias_kv_and_its_parallel_form():
    """A one-token prefix is PyTorch's own ``add_bias_kv`` key/value (appended, not prepended, which
    attention cannot tell apart), and ``form='parallel'`` computes the same attention."""
    torch.manual_seed(0)
    with_kv = nn.MultiheadAttention(16, 4, batch_first=True, add_bias_kv=True).double().eval()
    plain = nn.MultiheadAttention(16, 4, batch_first=True).double().eval()
    plain.load_state_dict({k: v for k, v in with_kv.state_dict().items() if not k.startswith("bias_")})
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    padding = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    outs = []
    for form in ("joint", "parallel"):
        model = utuning.tune(Holder(copy.deepcopy(plain)), [("prefix", "attn", {"tokens": 1, "form": form})],
                             backbone="generic").double().eval()
        prefix = model.backbone.slot("attn").tuners["prefix"]
        with torch.no_grad():
            prefix.key.copy_(with_kv.bias_k.view(1, 1, 4, 4).transpose(1, 2))  # (1, H, P=1, Dh)
            prefix.value.copy_(with_kv.bias_v.view(1, 1, 4, 4).transpose(1, 2))
            outs.append(model(x, x, x, key_padding_mask=padding, need_weights=False)[0])
    want = with_kv(x, x, x, key_padding_mask=padding, need_weights=False)[0]
    torch.testing.assert_close(outs[0], want, atol=1e-10, rtol=0)
    torch.testing.assert_close(outs[1], want, atol=1e-10, rtol=0)


def test_encoder_untuned_equals_pytorch_fast_path_and_tuners_are_not_skipped():
    """Under no_grad in eval PyTorch runs nn.TransformerEncoderLayer as one fused kernel; the
    adapter turns that path off, so tuners inside the layer are used, and untuned outputs agree."""
    ref = _encoder()
    padding = torch.zeros(3, 7, dtype=torch.bool)
    padding[1, -3:] = True
    tuned = utuning.tune(copy.deepcopy(ref), [("lora", "encoder.layers.*.self_attn.in_proj", {"rank": 2})],
                         backbone="generic", example_inputs=IDS).eval()
    with torch.no_grad():
        want = ref(IDS, padding)
        torch.testing.assert_close(tuned(IDS, padding), want, atol=1e-5, rtol=0)
        randomize_tuners(tuned)
        assert not torch.allclose(tuned(IDS, padding), want, atol=1e-3)
    assert torch.backends.mha.get_fastpath_enabled()  # restored after each forward


ENCODER_SPECS = {
    "lora-qv": [("lora", "encoder.layers.*.self_attn.in_proj", {"rank": 2, "parts": ["q", "v"]})],
    "lora-out-ffn": [("lora", ["encoder.layers.*.self_attn.out_proj", "encoder.layers.*.linear*"], {"rank": 2})],
    "p_prefix": [("p_prefix", "encoder.layers.*.self_attn", {"tokens": 3})],
    "p_adapter-layers": [("p_adapter", "encoder.layers.*", {"hidden": 4})],
    "prefix-and-adapter": [("prefix", "encoder.layers.1.self_attn", {"tokens": 2}),
                           ("adapter", "encoder.layers.0.self_attn", {"hidden": 4})],
}


@pytest.mark.parametrize("name", list(ENCODER_SPECS))
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch-first", "sequence-first"])
def test_encoder_tuners(name, batch_first):
    specs = ENCODER_SPECS[name]
    ref = _encoder(batch_first=batch_first)
    make = lambda: utuning.tune(copy.deepcopy(ref), specs, backbone="generic", example_inputs=IDS)  # noqa: E731
    tuned = make().eval()
    with torch.no_grad():
        if name != "prefix-and-adapter":  # prefixes change attention from the start
            torch.testing.assert_close(tuned(IDS), ref(IDS), atol=1e-6, rtol=0)
        before = tuned(IDS)
        randomize_tuners(tuned, std=0.2)
        assert not torch.allclose(tuned(IDS), before)
    assert_only_tuner_grads(tuned, {"ids": IDS})
    assert_state_round_trip(make, {"ids": IDS})
    assert all(k.startswith("encoder.layers.") for k in tuned.tuner_state_dict())


def test_lora_on_attention_merges():
    tuned = utuning.tune(_encoder(), [("lora", "encoder.layers.*.self_attn.in_proj", {"rank": 2}),
                                      ("lora", "encoder.layers.*.self_attn.out_proj", {"rank": 2})],
                         backbone="generic", example_inputs=IDS).double().eval()
    randomize_tuners(tuned)
    frozen = {k: v.clone() for k, v in tuned.backbone.model.state_dict().items()}
    with torch.no_grad():
        before = tuned(IDS)
        tuned.merge()
        torch.testing.assert_close(tuned(IDS), before, atol=1e-10, rtol=0)
        assert not torch.equal(tuned.backbone.model.encoder.layers[0].self_attn.in_proj_weight,
                               frozen["encoder.layers.0.self_attn.in_proj_weight"])
        tuned.unmerge()
    for k, v in tuned.backbone.model.state_dict().items():
        torch.testing.assert_close(v, frozen[k], atol=1e-12, rtol=0)


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch-first", "sequence-first"])
def test_side_tuners_read_encoder_layer_outputs(batch_first):
    """Side features are the encoder layers' outputs as (B, N, D), equal to running the layers by
    hand; bypass and ytuning train on them without gradients through the frozen model."""
    ref = _encoder(batch_first=batch_first)
    backbone = utuning.wrap(copy.deepcopy(ref), "generic", example_inputs=IDS, sequence_first=not batch_first)
    layers = {s.name: s.layer for s in backbone.site_specs().values() if s.layer is not None}
    assert layers["encoder.layers.0"] < layers["encoder.layers.1"]
    with torch.no_grad():
        feats = backbone.intermediates(IDS, layers=[layers["encoder.layers.0"], layers["encoder.layers.1"]])
        x = ref.embed(IDS) if batch_first else ref.embed(IDS).transpose(0, 1)
        h0 = ref.encoder.layers[0](x)
        h1 = ref.encoder.layers[1](h0)
        for got, want in ((feats.layers[layers["encoder.layers.0"]], h0), (feats.final, h1)):
            torch.testing.assert_close(got, want if batch_first else want.transpose(0, 1), atol=1e-5, rtol=0)
    for name, args in (("bypass", {"num_classes": 3, "hidden": 4, "pool": "mean"}),
                       ("ytuning", {"num_labels": 3, "hidden": 16, "heads": 2})):
        tuned = utuning.tune(copy.deepcopy(backbone), [(name, "encoder.layers.*", args)])
        out = tuned(IDS)
        assert out.shape == (3, 3)
        assert_only_tuner_grads(tuned, {"ids": IDS})
    # LoRA inside the attention and a side tuner beside it: the features carry LoRA's gradients.
    tuned = utuning.tune(copy.deepcopy(backbone), [("lora", "encoder.layers.*.self_attn.in_proj", {"rank": 2}),
                                                   ("bypass", "encoder.layers.*", {"num_classes": 3, "hidden": 4})])
    randomize_tuners(tuned)
    assert_only_tuner_grads(tuned, {"ids": IDS})


def test_decoder_cross_attention_tuners():
    """nn.TransformerDecoder: LoRA and a prefix on the cross-attention (query from the target, keys
    and values from the memory) start from PyTorch's outputs and train only themselves."""
    torch.manual_seed(0)
    layer = nn.TransformerDecoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    ref = nn.TransformerDecoder(layer, 2).eval()
    tgt, memory = torch.randn(2, 4, 16), torch.randn(2, 6, 16)
    specs = [("lora", "layers.*.multihead_attn.in_proj", {"rank": 2, "parts": ["k", "v"]}),
             ("p_prefix", "layers.*.multihead_attn", {"tokens": 2})]
    tuned = utuning.tune(copy.deepcopy(ref), specs, backbone="generic", example_inputs=(tgt, memory)).eval()
    with torch.no_grad():
        torch.testing.assert_close(tuned(tgt, memory), ref(tgt, memory), atol=1e-6, rtol=0)
        randomize_tuners(tuned)
        assert not torch.allclose(tuned(tgt, memory), ref(tgt, memory), atol=1e-4)
    assert_only_tuner_grads(tuned, {"tgt": tgt, "memory": memory})
