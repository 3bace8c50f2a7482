"""HF PEFT prompt-learning adapters on HF text encoders (BERT, RoBERTa, ELECTRA): ``PROMPT_TUNING``
(and ``P_TUNING``, whose folder holds the same prompts) and ``PREFIX_TUNING``, read and written.

PEFT keeps one tensor, ``prompt_embeddings``:

- prompt tuning (Lester et al. 2021, arXiv 2104.08691): (P, D) word embeddings prepended to the
  input's word embeddings, before [CLS]; positions and token types (0) are counted over the whole
  sequence and HF's head reads its first token. That is ``prompt`` at ``embed`` on the ``hf_text``
  backbone built with ``prompt_layout="first"``.
- prefix tuning (Li & Liang 2021, arXiv 2101.00190): (P, 2·L·D), viewed as (P, L·2, H, Dh): per layer
  l, keys ``[:, 2l]`` and values ``[:, 2l+1]`` passed as ``past_key_values``. That is ``prefix`` at
  every ``blocks.{l}.attn``. HF's BERT also shifts the input's absolute position ids by P when keys
  arrive that way; ``shift_positions=True`` reproduces it (``position_offset=P`` on the backbone),
  the default keeps the input's own positions (the prefix then only adds keys and values).

Config fields that only shape PEFT's training-time initialisation or encoder (the saved tensor is
that encoder's output) are accepted and not used; anything else non-default is refused by name.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from utuning.backbone import Backbone, wrap
from utuning.errors import ConfigError, StateDictError
from utuning.model import TunedModel, tune

KINDS = ("PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING")
TUNERS = ("prompt", "prefix")
SHAPE = {"num_virtual_tokens", "token_dim", "num_transformer_submodules", "num_attention_heads", "num_layers"}
INIT_ONLY = {"prompt_tuning_init", "prompt_tuning_init_text", "tokenizer_name_or_path", "tokenizer_kwargs",
             "prefix_projection", "encoder_hidden_size", "encoder_reparameterization_type", "encoder_num_layers",
             "encoder_dropout", "init_weights"}
METADATA = {"peft_type", "task_type", "base_model_name_or_path", "revision", "peft_version", "auto_mapping",
            "inference_mode", "modules_to_save"}
KEY = "prompt_embeddings"


def _check_fields(config: dict[str, Any]) -> None:
    for field, value in config.items():
        if field in SHAPE | INIT_ONLY | METADATA or value in (None, False, 0, 0.0, "", [], {}):
            continue
        raise ConfigError(f"PEFT {config['peft_type']} config field {field}={value!r} is not supported by utuning's "
                          "reader; refusing rather than ignoring it")
    if config.get("num_transformer_submodules", 1) != 1:
        raise ConfigError(f"PEFT {config['peft_type']} with num_transformer_submodules="
                          f"{config['num_transformer_submodules']} (an encoder-decoder) is not read: hf_text wraps encoders")


def _backbone(model: Backbone | nn.Module, options: dict[str, Any]) -> Backbone:
    if not isinstance(model, Backbone):
        return wrap(model, **options)
    have = {k: getattr(model, k, None) for k in options}
    if have != options:
        raise ConfigError(f"This PEFT adapter needs the text backbone built with {options}; the given one has {have}: "
                          "pass the unwrapped model, or wrap it with these options")
    return model


def load_prompt_learning(model: Backbone | nn.Module, config: dict[str, Any], tensors: dict[str, Tensor], *,
                         shift_positions: bool = False) -> TunedModel:
    """``load_peft`` for the kinds in ``KINDS`` (called by it); ``tensors`` as in the folder."""
    from utuning.peft_format import _Index, _modules_to_save, copy_fitting

    _check_fields(config)
    kind, tokens = config["peft_type"], config.get("num_virtual_tokens")
    prefix = kind == "PREFIX_TUNING"
    if shift_positions and not prefix:
        raise ConfigError(f"shift_positions applies to PREFIX_TUNING adapters; PEFT's {kind} prompts are words "
                          "before [CLS], which shift positions anyway")
    if not isinstance(tokens, int) or tokens < 1:
        raise ConfigError(f"PEFT {kind} config field num_virtual_tokens={tokens!r} must be a positive integer")
    options = ({"prompt_layout": "after_cls", "position_offset": tokens if shift_positions else 0} if prefix
               else {"prompt_layout": "first", "position_offset": 0})
    backbone = _backbone(model, options)
    if KEY not in tensors:
        raise StateDictError(f"The PEFT {kind} adapter holds no {KEY!r} tensor (keys: {sorted(tensors)[:6]})")
    table = tensors[KEY]  # (P, D) prompt tuning, (P, 2*L*D) prefix
    rest = {k.removeprefix("base_model."): t for k, t in tensors.items() if k != KEY}
    index = _Index(backbone)
    saved = _modules_to_save(rest, config, index)
    head_sites = sorted({index.linear.get(o) or index.holder_site(o) for o in {p.rsplit(".", 1)[0] for p in saved}})
    specs: list[Any] = [("prefix", "blocks.*.attn", {"tokens": tokens}) if prefix else ("prompt", "embed", {"tokens": tokens})]
    specs += [("full", s, {}) for s in head_sites]
    tuned = tune(backbone, specs)
    copies = []  # (target, value, what)
    for a in tuned.attached():
        t = a.tuner
        if a.tuner.name == "prompt":
            copies.append((t.prompts, table[None], KEY))
        elif a.tuner.name == "prefix":
            layer = backbone.site_specs()[a.sites[0]].layer
            k, v = _prefix_kv(table, backbone.num_layers, t.shape[1], layer)
            copies += [(t.key, k, f"{KEY} keys of layer {layer}"), (t.value, v, f"{KEY} values of layer {layer}")]
    copies += [(backbone.model.get_parameter(p), t, p) for p, t in saved.items()]
    copy_fitting(copies)
    return tuned


def _prefix_kv(table: Tensor, layers: int, heads: int, layer: int) -> tuple[Tensor, Tensor]:
    """Layer ``layer``'s keys and values, each (1, H, P, Dh), from PEFT's (P, 2*L*D) table."""
    p, width = table.shape
    if width % (2 * layers * heads):
        raise StateDictError(f"PEFT prefix table of width {width} does not split into {layers} layers x (key, value) x "
                             f"{heads} heads: was the adapter trained on this model?")
    kv = table.view(p, 2 * layers, heads, width // (2 * layers * heads))  # (P, L*2, H, Dh)
    return kv[:, 2 * layer].transpose(0, 1)[None], kv[:, 2 * layer + 1].transpose(0, 1)[None]


def collect_prompt_learning(tuned: TunedModel) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """``export_peft``'s config and tensors for a model whose tuners are ``prompt`` at ``embed`` (with
    ``prompt_layout="first"``) or ``prefix`` at every attention (with ``position_offset`` equal to its
    tokens, as PEFT runs it on BERT), plus a trained head (``modules_to_save``)."""
    from utuning.peft_format import _Index, _saved_modules

    backbone = tuned.backbone
    specs = backbone.site_specs()
    layout, offset = getattr(backbone, "prompt_layout", None), getattr(backbone, "position_offset", None)
    if layout is None:
        raise ConfigError(f"PEFT's prompt learning adapters are read and written on the hf_text backbone only, not "
                          f"a {type(backbone).__name__}")
    ours, saved = [], {}
    for a in tuned.attached():
        if a.tuner.name == "full" or (a.tuner.name == "linear_probe" and specs[a.sites[0]].kind == "head"):
            saved.update(_saved_modules(a, _Index(backbone)))
        elif a.tuner.name in TUNERS:
            ours.append(a)
        else:
            raise ConfigError(f"A PEFT prompt learning adapter holds no other tuner: {a.tuner.name!r} at {a.sites[0]!r}")
    if len({a.tuner.name for a in ours}) != 1:
        raise ConfigError("A PEFT adapter folder holds one adapter type; this model has both prompt and prefix")
    name, sites = ours[0].tuner.name, sorted(s for a in ours for s in a.sites)
    attn = sorted(s for s, spec in specs.items() if spec.kind == "attn")
    if name == "prompt":
        if sites != ["embed"] or layout != "first":
            raise ConfigError(f"PEFT's prompt tuning prepends word embeddings before [CLS]: export 'prompt' at 'embed' "
                              f"of a backbone built with prompt_layout='first' (this one: sites {sites}, "
                              f"prompt_layout={layout!r})")
        table = ours[0].tuner.prompts[0]  # (P, E)
    else:
        if sites != attn:
            raise ConfigError(f"PEFT's prefix tuning has keys and values at every layer: 'prefix' must be at {attn}, "
                              f"not {sites}")
        by_layer = {specs[a.sites[0]].layer: a.tuner for a in ours}
        kv = [torch.stack([k[0], v[0]]) for k, v in (by_layer[i].key_value() for i in range(backbone.num_layers))]
        table = torch.cat(kv).permute(2, 0, 1, 3).flatten(1)  # (L*2, H, P, Dh) -> (P, L*2*H*Dh)
        if offset != table.shape[0]:
            raise ConfigError(f"PEFT's prefix tuning on BERT shifts the input's positions by its {table.shape[0]} "
                              f"tokens; this model was run with position_offset={offset}, so PEFT would compute "
                              f"something else: train it with position_offset={table.shape[0]} to export it")
    config: dict[str, Any] = {
        "peft_type": "PROMPT_TUNING" if name == "prompt" else "PREFIX_TUNING",
        "task_type": "SEQ_CLS" if isinstance(backbone.model, backbone.family.classifier) else "FEATURE_EXTRACTION",
        "inference_mode": True, "num_virtual_tokens": table.shape[0], "num_transformer_submodules": 1,
        "num_layers": backbone.num_layers, "token_dim": specs["embed"].dim, "num_attention_heads": specs[attn[0]].num_heads}
    if config["task_type"] == "SEQ_CLS" and "classifier" not in saved:
        # PEFT's SEQ_CLS models always save (and expect) the classifier: PEFT's modules_to_save default.
        saved["classifier"] = dict(backbone.model.get_submodule("classifier").named_parameters())
    tensors = {KEY: table}
    if saved:
        config["modules_to_save"] = sorted(saved)
        tensors.update({f"base_model.{path}.{n}": p for path, params in saved.items() for n, p in params.items()})
    return config, tensors
