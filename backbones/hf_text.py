"""Hugging Face text encoders: BERT, RoBERTa, ELECTRA and DeBERTa-v2/v3 (registered as ``hf_text``).

``create(model=..., num_classes=..., pretrained=...)`` builds an ``AutoModelForSequenceClassification``
from a hub name or a local folder (``pretrained=True`` loads its weights), or from a config alone
(``pretrained=False``; ``model`` may then be a model type such as ``"bert"`` plus config overrides,
which is how the tests build tiny models offline). ``utuning.wrap`` accepts such models, and the
families' base models (``BertModel``...), already built. One adapter serves every family through
``FAMILIES``, a small table keyed by ``config.model_type``.

Sites (the layers are re-written in ``hf_text_layers``; operations end before residual + LayerNorm)::

    embed                      word/position/type embeddings + LayerNorm; prompts go after [CLS] / <s>
    blocks.{i}                 a whole encoder layer (DeBERTa block 0 includes the conv layer if any)
    blocks.{i}.attn            self-attention + output dense + dropout
    blocks.{i}.mlp             intermediate dense + act + output dense + dropout
    blocks.{i}.attn.q|k|v|proj query / key / value / attention-output dense
    blocks.{i}.mlp.fc1|fc2     intermediate dense / output dense
    norm                       none in post-LN encoders: an identity without parameters, present so
                               that whole-model patterns (``full_finetune``) fit every backbone
    head                       HF's sequence-classification head on the pooled final states (B, D) -> (B, C)

Prompt layout (``prompt_layout=``): ``"after_cls"`` (default) inserts ``prompt`` tokens at ``embed``
after the [CLS] token's embedding, with no position of their own. ``"first"`` is HF PEFT's prompt
tuning (Lester et al. 2021, arXiv 2104.08691): the ``embed`` site's input is the word embeddings
(B, N, E), prompts go before the first token, and positions, token types (0) and LayerNorm are
applied over the whole sequence, so the input's positions shift by the prompt length; ``"cls"``
pooling then reads the first token of that sequence (the first prompt), as HF's head does on it.
``position_offset=P`` starts the absolute position ids at P: HF's BERT does so when given P
``past_key_values``, which is how a PEFT prefix-tuning adapter was trained (``utuning.peft_format``).

Pooling (``pooling=``): ``"cls"`` (default, what HF's heads read) is the final state of the first
token; ``"mean"`` is the mean final state over real tokens (prompts and padding excluded), how
sentence-transformers models such as all-MiniLM-L6-v2 were trained to be read.

The head: the operation is the family's own classifier (BERT: pooler + classifier; RoBERTa and
ELECTRA: ``classifier`` (dense, act, out_proj); DeBERTa: ``ContextPooler`` + classifier), and its
input, the pooled features, is the final hidden state of the first token (``pooling="cls"``) or the
mean over real tokens (``pooling="mean"``). ``linear_probe`` thus trains a linear layer on the pooled
features in place of that head (the pooler layers, newly initialised for
most families, are not kept); ``unfreeze`` (``full``) trains the HF head itself. Base models have
no head: the ``head`` operation returns the pooled [CLS] features.

DeBERTa refuses ``prefix`` (``prefix``, ``prompt_parallel``) and the ``query`` / ``key_value``
handle features (``p_prefix``, ``p_prompt``): see ``hf_text_layers.DEBERTA_REFUSAL``.

Side tuners read ``intermediates`` from this adapter's own encoder loop rather than HF's
``output_hidden_states``: in transformers 5 hidden states are recorded by hooks on HF's layer
classes, which the re-written layers replace, and HF's encoders pass one precomputed mask of the
input length, which cannot follow prompt tokens that slots insert.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import transformers as tf
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from utuning.backbone import Backbone, Features, refuse
from utuning.backbones.hf_export import HFFolderExport
from utuning.backbones.hf_text_layers import (
    DEBERTA_FEATURE_REFUSAL,
    DEBERTA_REFUSAL,
    FAMILIES,
    DebertaLayer,
    Family,
    TextLayer,
    TextOpHandle,
)
from utuning.errors import ConfigError, PlacementError, UnknownNameError, closest
from utuning.handle import OpHandle
from utuning.registry import register_backbone
from utuning.sites import SiteSpec
from utuning.slot import Slot, remove_tokens
from utuning.versions import require

_OP_PLACEMENTS = frozenset({"parallel", "sequential", "unfreeze"})
_LINEARS = {  # site suffix -> (module path in the layer: BERT-style, DeBERTa)
    "attn.q": ("attention.self.query", "attention.self.query_proj"),
    "attn.k": ("attention.self.key", "attention.self.key_proj"),
    "attn.v": ("attention.self.value", "attention.self.value_proj"),
    "attn.proj": ("attention.output.dense", "attention.output.dense"),
    "mlp.fc1": ("intermediate.dense", "intermediate.dense"),
    "mlp.fc2": ("output.dense", "output.dense"),
}


class TextEmbedHandle(OpHandle):
    """The embed site of a backbone with a tokenizer: ``embed_text`` gives label-name embeddings."""

    def __init__(self, modules: dict[str, Any], tokenizer: Any, word_embeddings: nn.Embedding,
                 project: nn.Module | None) -> None:
        super().__init__("embed", modules)
        self.tokenizer = tokenizer
        self.word_embeddings = word_embeddings
        self.project = project

    @torch.no_grad()
    def embed_text(self, texts: list[str]) -> Tensor:
        """Mean frozen word embedding of each text's tokens (no special tokens): (L, D).

        Families whose embedding size differs from the hidden size (ELECTRA, some DeBERTa) apply
        their frozen embedding projection, so the result is in the hidden size."""
        rows = []
        for text in texts:
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if not ids:
                raise ConfigError(f"Label name {text!r} tokenizes to no tokens; give a non-empty name")
            rows.append(self.word_embeddings.weight[torch.tensor(ids, device=self.word_embeddings.weight.device)].mean(0))
        out = torch.stack(rows)  # (L, E)
        return self.project(out) if self.project is not None else out  # (L, D)


POOLINGS = ("cls", "mean")
PROMPT_LAYOUTS = ("after_cls", "first")


def _check_pooling(pooling: str) -> None:
    if pooling not in POOLINGS:
        raise ConfigError(f"pooling={pooling!r} is not one of {list(POOLINGS)} (closest: {closest(str(pooling), POOLINGS)})")


def _family(model: nn.Module) -> Family | None:
    config = getattr(model, "config", None)
    family = FAMILIES.get(getattr(config, "model_type", None))
    if family is None or not isinstance(model, (family.base, family.classifier)):
        return None
    return family


def _check(model: nn.Module, family: Family) -> None:
    """Everything the re-written forward does not reproduce, refused before anything is modified."""
    config, name = model.config, type(model).__name__
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        raise refuse(f"A decoder {name} (is_decoder / add_cross_attention)", "hf_text wraps bidirectional encoders")
    if getattr(config, "position_embedding_type", None) not in (None, "absolute"):
        raise refuse(f"position_embedding_type={config.position_embedding_type!r}", "only absolute positions are re-written")
    base = model.base_model
    for i, layer in enumerate(base.encoder.layer):
        if type(layer) is not family.layer:
            raise refuse(f"encoder.layer.{i} is a {type(layer).__name__}", f"only {family.layer.__name__} is re-written")
        extra = set(dict(layer.named_children())) - {"attention", "intermediate", "output"}
        if extra:
            raise refuse(f"encoder.layer.{i} has extra submodules {sorted(extra)}", "the re-written forward skips them")
        for path, names in (DebertaLayer if family.deberta else TextLayer).READS.items():
            require(layer.get_submodule(path), names, where=f"encoder.layer.{i}.{path}", library="transformers")
        if family.deberta and layer.attention.self.relative_attention:
            require(layer.attention.self, DebertaLayer.READS_RELATIVE, where=f"encoder.layer.{i}.attention.self",
                    library="transformers")


@register_backbone("hf_text")
class HFTextBackbone(HFFolderExport, Backbone):
    """BERT / RoBERTa / ELECTRA / DeBERTa-v2 encoders with sites embed, blocks.{i}[.attn|.mlp][.q|.k|.v|.proj|
    .fc1|.fc2], norm, head. ``forward(input_ids, attention_mask=None, token_type_ids=None)`` -> logits (B, C)."""

    @classmethod
    def accepts(cls, model: nn.Module) -> bool:
        return _family(model) is not None

    @classmethod
    def create(cls, *, model: str = "bert-base-uncased", num_classes: int | None = None, pretrained: bool = False,
               tokenizer: bool = True, pooling: str = "cls", prompt_layout: str = "after_cls",
               position_offset: int = 0, **config_overrides: Any) -> HFTextBackbone:
        """Build an ``AutoModelForSequenceClassification`` and wrap it.

        model: a hub name or local folder (its config, weights with ``pretrained=True``, and its
            tokenizer), or a model type in ``FAMILIES`` (``"bert"``, ``"roberta"``, ``"electra"``,
            ``"deberta-v2"``) to build from a default config with ``pretrained=False``.
        num_classes: classifier outputs (``num_labels``); default the config's.
        tokenizer: load ``AutoTokenizer`` from the same name/folder (never for a bare model type).
        pooling: ``"cls"`` (first token, HF's heads) or ``"mean"`` (over real tokens).
        prompt_layout, position_offset: see the module docstring (PEFT's prompt and prefix layouts).
        config_overrides: config fields, e.g. ``hidden_size=32, num_hidden_layers=2``; unknown fields fail.
        """
        model, overrides = str(model), dict(config_overrides)
        _check_pooling(pooling)
        if num_classes is not None:
            overrides["num_labels"] = num_classes
        from_type = model in FAMILIES and not Path(model).is_dir()
        if from_type and pretrained:
            raise ConfigError(f"model={model!r} is a model type, which has no weights; give a hub name or a folder "
                              "for pretrained=True, or pretrained=False to build from a config")
        try:
            base_config = tf.AutoConfig.for_model(model) if from_type else tf.AutoConfig.from_pretrained(model)
        except (OSError, ValueError) as e:
            raise ConfigError(f"Cannot read a config for model={model!r} (hub name, local folder, or one of "
                              f"{sorted(FAMILIES)}): {e}") from e
        if base_config.model_type not in FAMILIES:
            raise UnknownNameError(f"model={model!r} is a {base_config.model_type!r} model; hf_text wraps "
                                   f"{sorted(FAMILIES)} (closest: {closest(base_config.model_type, FAMILIES)})")
        known = set(base_config.to_dict()) | {"num_labels"} | set(FAMILIES[base_config.model_type].config_fields)
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ConfigError(f"Unknown {base_config.model_type} config field {unknown[0]!r}; "
                              f"did you mean {closest(unknown[0], known)}?")
        for key, value in overrides.items():
            setattr(base_config, key, value)
        if pretrained:
            # A new num_classes replaces a fine-tuned checkpoint's classifier instead of failing on its shape.
            net = tf.AutoModelForSequenceClassification.from_pretrained(
                model, config=base_config, ignore_mismatched_sizes=num_classes is not None)
        else:
            net = tf.AutoModelForSequenceClassification.from_config(base_config)
        tok = None
        if tokenizer and not from_type:
            try:
                tok = tf.AutoTokenizer.from_pretrained(model)
            except (OSError, ValueError) as e:
                raise ConfigError(f"Cannot load a tokenizer for model={model!r}: {e}; pass tokenizer=False "
                                  "to build without one") from e
        return cls(net, tokenizer=tok, pooling=pooling, prompt_layout=prompt_layout, position_offset=position_offset)

    def __init__(self, model: nn.Module, *, tokenizer: Any = None, pooling: str = "cls",
                 prompt_layout: str = "after_cls", position_offset: int = 0) -> None:
        _check_pooling(pooling)
        if prompt_layout not in PROMPT_LAYOUTS:
            raise ConfigError(f"prompt_layout={prompt_layout!r} is not one of {list(PROMPT_LAYOUTS)} "
                              f"(closest: {closest(str(prompt_layout), PROMPT_LAYOUTS)})")
        if not isinstance(position_offset, int) or position_offset < 0:
            raise ConfigError(f"position_offset={position_offset!r} must be an integer >= 0")
        family = _family(model)
        if family is None:
            raise refuse(f"A {type(model).__name__}", f"hf_text wraps the {sorted(FAMILIES)} encoders and their "
                         "*ForSequenceClassification models")
        _check(model, family)  # all checks before anything is modified
        if family.deberta and (prompt_layout != "after_cls" or position_offset):
            raise refuse("prompt_layout / position_offset on DeBERTa", "its embeddings take no position offset and "
                         "its relative attention does not use absolute positions")
        super().__init__(model)
        self.prompt_layout, self.position_offset = prompt_layout, position_offset
        self.family = family
        self.tokenizer = tokenizer
        self.pooling = pooling
        base = model.base_model
        self.base = [base]  # plain list: the encoder stays registered under self.model only
        config = base.config
        dim = config.hidden_size
        embed_modules: dict[str, Any] = {"embeddings": base.embeddings}
        for name in ("embeddings_project",):
            if hasattr(base, name):
                embed_modules[name] = getattr(base, name)
        if family.deberta:
            embed_modules.update({"rel_embeddings": getattr(base.encoder, "rel_embeddings", None),
                                  "rel_norm": getattr(base.encoder, "LayerNorm", None)})
        embed_modules = {k: v for k, v in embed_modules.items() if v is not None}
        features = frozenset({"embed_text"}) if tokenizer is not None else frozenset()
        first = prompt_layout == "first"  # PEFT: prompts are word embeddings before the first token
        spec = SiteSpec("embed", "embed", base.embeddings.word_embeddings.embedding_dim if first else dim,
                        frozenset({"prompt", "unfreeze"}), prefix_tokens=0 if first else 1, features=features)
        if tokenizer is not None:
            emb = base.embeddings
            project = getattr(base, "embeddings_project", None) or getattr(emb, "embed_proj", None)
            self.add_site(spec, TextEmbedHandle(embed_modules, tokenizer, emb.word_embeddings, project))
        else:
            self.add_site(spec, OpHandle("embed", embed_modules))
        layers = base.encoder.layer
        for i, layer in enumerate(layers):
            slots = self._layer_slots(i, layer)
            if family.deberta:
                conv = base.encoder.conv if i == 0 else None
                layers[i] = DebertaLayer(layer, slots, base.encoder, conv)
            else:
                layers[i] = TextLayer(layer, slots)
        self.add_site(SiteSpec("norm", "norm", dim, frozenset({"unfreeze"})), OpHandle("norm", {}))
        is_classifier = isinstance(model, family.classifier)
        head_modules = {n: model.get_submodule(n) for n in family.head_modules} if is_classifier else {}
        out_dim = config.num_labels if is_classifier else dim
        self.add_site(SiteSpec("head", "head", dim, frozenset({"replace", "unfreeze"}), out_dim=out_dim),
                      OpHandle("head", head_modules))

    def _layer_slots(self, i: int, layer: nn.Module) -> dict[str, Slot]:
        s, dim, deberta = layer.attention.self, self.model.config.hidden_size, self.family.deberta
        p = f"blocks.{i}"
        common: dict[str, Any] = {"layer": i, "num_heads": s.num_attention_heads, "head_dim": s.attention_head_size,
                                  "prefix_tokens": 1}
        if deberta:
            common["refused"] = {"prefix": DEBERTA_REFUSAL, **DEBERTA_FEATURE_REFUSAL}
        else:
            common["features"] = frozenset({"query", "key_value"})
        attn_places = _OP_PLACEMENTS if deberta else _OP_PLACEMENTS | {"prefix"}

        def handle(site: str, modules: dict[str, Any]) -> OpHandle:
            return OpHandle(site, modules) if deberta else TextOpHandle(site, modules, s)

        mods_attn = {"attention": layer.attention}
        mods_mlp = {"intermediate": layer.intermediate, "output": layer.output}
        mods_block = {**mods_attn, **mods_mlp}
        conv = getattr(self.base[0].encoder, "conv", None) if deberta and i == 0 else None
        if conv is not None:
            mods_block["conv"] = conv
        slots = {
            "block": self.add_site(SiteSpec(p, "block", dim, _OP_PLACEMENTS | {"prompt"}, **common),
                                   handle(p, mods_block)),
            "attn": self.add_site(SiteSpec(f"{p}.attn", "attn", dim, attn_places, **{**common, "features": common.get(
                "features", frozenset()) | (frozenset() if deberta else {"raw_key_value", "out_proj"})}),
                                  handle(f"{p}.attn", mods_attn)),
            "mlp": self.add_site(SiteSpec(f"{p}.mlp", "mlp", dim, _OP_PLACEMENTS, **common),
                                 handle(f"{p}.mlp", mods_mlp)),
        }
        for name, paths in _LINEARS.items():
            lin = layer.get_submodule(paths[deberta])
            slots[name] = self.add_linear_site(f"{p}.{name}", lin, index=i)
        return slots

    grad_checkpointing = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = bool(enable)

    # Running ----------------------------------------------------------------------------
    def _mask(self, input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
        if attention_mask is None:
            return torch.ones_like(input_ids, dtype=torch.bool)
        if attention_mask.shape != input_ids.shape:
            raise ConfigError(f"attention_mask has shape {tuple(attention_mask.shape)}; expected (B, N) = "
                              f"{tuple(input_ids.shape)} like input_ids (True / 1 for real tokens)")
        return attention_mask.bool()

    def _encode(self, input_ids: Tensor, attention_mask: Tensor | None, token_type_ids: Tensor | None,
                layers: list[int] = ()) -> tuple[Tensor, Tensor, dict[int, Tensor], Tensor]:
        """Final hidden states (B, N, D), the mask (B, N), the chosen blocks' outputs (kept prompts
        removed) and the final state of the sequence's first token (B, D), prompts included."""
        base, n = self.base[0], input_ids.shape[1]
        mask = self._mask(input_ids, attention_mask)
        if self.prompt_layout == "first":  # (B, N, E) words; prompts go in before positions and LayerNorm
            x, m = self.slot("embed").around(base.embeddings.word_embeddings(input_ids),
                                             lambda t, _: self._embed(t, token_type_ids), mask)  # (B, P + N, D)
        else:
            x = self._embed(input_ids, token_type_ids, mask)
            x, m = self.slot("embed").around(x, lambda t, _: t, mask)  # (B, N [+P], D)
        wanted, outs = set(layers), {}
        for i, layer in enumerate(base.encoder.layer):
            if self.grad_checkpointing and torch.is_grad_enabled():
                # Non-reentrant: tuners inside the layer get gradients though frozen inputs need none.
                x, m = checkpoint(layer, x, m, use_reentrant=False)
            else:
                x, m = layer(x, m)
            if i in wanted:
                outs[i] = self._strip(x, n)
        first = x[:, 0]  # (B, D)
        x = self.slot("norm").apply(self._strip(x, n), lambda t, _: t)
        return x, mask, outs, first

    def _embed(self, tokens: Tensor, token_type_ids: Tensor | None, mask: Tensor | None = None) -> Tensor:
        """HF's embeddings of token ids (B, N) or of word embeddings (B, P + N, E) -> (B, N', D)."""
        base = self.base[0]
        if self.family.deberta:
            x = base.embeddings(input_ids=tokens, token_type_ids=token_type_ids, mask=mask)
        elif tokens.is_floating_point():  # prompts were prepended: their token type is 0, as in PEFT
            if token_type_ids is not None:
                token_type_ids = nn.functional.pad(token_type_ids, (tokens.shape[1] - token_type_ids.shape[1], 0))
            x = base.embeddings(inputs_embeds=tokens, token_type_ids=token_type_ids, cache_length=self.position_offset)
        else:
            x = base.embeddings(input_ids=tokens, token_type_ids=token_type_ids, cache_length=self.position_offset)
        return base.embeddings_project(x) if hasattr(base, "embeddings_project") else x

    def _strip(self, x: Tensor, n_tokens: int) -> Tensor:
        # Prompts kept past their block (prompt at embed) sit right after [CLS], or before it (PEFT's layout).
        return remove_tokens(x, x.shape[1] - n_tokens, 0 if self.prompt_layout == "first" else 1)[0]

    def export_native(self, out: Path, tensors: Mapping[str, Tensor],
                      metadata: Mapping[str, str] | None = None) -> list[str]:
        """The ``from_pretrained`` folder (``HFFolderExport``). Refused with ``position_offset`` (HF's
        forward would not shift the positions); a note says when ``pooling="mean"`` (HF's heads read
        the first token) differs from the model's own head."""
        if self.position_offset:
            raise ConfigError(f"position_offset={self.position_offset} shifts the absolute positions, which the "
                              "exported HF model would not do, so its outputs would differ; export with "
                              "--format pretrained or peft instead")
        notes = super().export_native(out, tensors, metadata)
        if self.pooling != "cls":
            notes.append(f"pooling={self.pooling!r} is not part of the HF model: its head reads the first token; "
                         "average last_hidden_state over real tokens for the features this run used")
        return notes

    def feature_options(self) -> dict[str, Any]:
        layout = {"prompt_layout": self.prompt_layout, "position_offset": self.position_offset}
        return {"pooling": self.pooling, **{k: v for k, v in layout.items() if v not in ("after_cls", 0)}}

    def pool(self, x: Tensor, mask: Tensor, first: Tensor | None = None) -> Tensor:  # (B, N, D), (B, N) -> (B, D)
        """``first``: the final state of the sequence's first token, prompts included (``_encode``)."""
        if self.pooling == "cls":
            return x[:, 0] if first is None else first
        m = mask[..., None].to(x.dtype)  # (B, N, 1)
        return (x * m).sum(1) / m.sum(1).clamp_min(1)

    def head(self, pooled: Tensor) -> Tensor:  # (B, D) -> (B, C)
        if isinstance(self.model, self.family.classifier):
            return self.slot("head").apply(pooled, lambda t, _: self.family.head(self.model, t))
        return self.slot("head").apply(pooled, lambda t, _: t)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                token_type_ids: Tensor | None = None) -> Tensor:  # (B, N) -> (B, C)
        x, mask, _, first = self._encode(input_ids, attention_mask, token_type_ids)
        return self.head(self.pool(x, mask, first))

    def intermediates(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                      token_type_ids: Tensor | None = None, *, layers: list[int]) -> Features:
        """Outputs (B, N, D) of the chosen blocks, the final states, the pooled features (B, D) and the mask."""
        bad = [i for i in layers if not 0 <= i < self.num_layers]
        if bad:
            raise PlacementError(f"Layer {bad[0]} does not exist; this encoder has blocks 0..{self.num_layers - 1}")
        x, mask, outs, first = self._encode(input_ids, attention_mask, token_type_ids, list(layers))
        return Features({i: outs[i] for i in sorted(set(layers))}, x, self.pool(x, mask, first), mask,
                        {"prefix_tokens": 1})

    def example_inputs(self, batch_size: int = 2, seq_len: int = 8) -> dict[str, Tensor]:
        """Random token ids with [CLS]-like first token; every second row is padded (3 tokens fewer)."""
        ids, mask = padded_token_ids(self.model.config, batch_size, seq_len,
                                     first=getattr(self.tokenizer, "cls_token_id", None))
        return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


def padded_token_ids(config: Any, batch_size: int, seq_len: int, *, first: int | None = None) -> tuple[Tensor, Tensor]:
    """Seeded random token ids (never the pad id; ``first`` as every row's first token) and a mask
    (B, N) in which every second row is right-padded by 3 tokens (padded ids are the pad id)."""
    g = torch.Generator().manual_seed(0)
    pad = config.pad_token_id if config.pad_token_id is not None else 0
    ids = torch.randint(0, config.vocab_size, (batch_size, seq_len), generator=g)
    ids[ids == pad] = (pad + 1) % config.vocab_size
    if first is not None:
        ids[:, 0] = first
    mask = torch.ones(batch_size, seq_len, dtype=torch.long)
    mask[1::2, seq_len - 3:] = 0
    return ids.masked_fill(mask == 0, pad), mask


# A tiny config for offline checks and benchmarks: ``create(model="bert", pretrained=False, **TINY)``.
TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
        "vocab_size": 100, "max_position_embeddings": 64}
