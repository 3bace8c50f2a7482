"""HF PEFT adapter folders, both ways: ``load_peft`` reads one onto the same base model as an
ordinary ``TunedModel``; ``export_peft`` writes a ``TunedModel``'s tuners as one.

A PEFT folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` whose keys are
``base_model.model.{module path}.{tensor}``. Module paths are those of the wrapped model, which a
backbone adapter keeps unchanged, so a path finds its site by module identity: a linear layer is a
linear site, any other module the most specific site whose handle holds it. Which modules are
adapted is read from the weights (so ``target_modules``, ``layers_to_transform``,
``layers_pattern`` and ``exclude_modules`` need no re-implementation), each module's rank from its
tensors and its alpha from ``alpha_pattern``. A config field this module does not implement is
refused by name unless it holds its neutral default.

Kinds: LoRA (``use_dora``, ``use_rslora``, ``rank_pattern``/``alpha_pattern``, PiSSA/OLoRA
``init_lora_weights``), IA3, LoHa, LoKr, OFT, LN tuning, VeRA, and ``modules_to_save`` (heads).
Prompt tuning (and P-tuning's saved prompts) and prefix tuning on HF text encoders are in
``utuning.peft_prompts`` (PEFT's prompt layout and, on request, its position shift under a prefix).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from utuning import peft_prompts as prompts
from utuning.backbone import Backbone, wrap
from utuning.errors import ConfigError, PlacementError, StateDictError, UtuningError
from utuning.model import TunedModel, tune, unwrap

CONFIG, WEIGHTS, LEGACY = "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"
PREFIX = "base_model.model."
#: Fields that describe the folder, not the computation (what they select is read from the weights).
METADATA = {"peft_type", "task_type", "base_model_name_or_path", "revision", "peft_version", "auto_mapping",
            "inference_mode", "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern",
            "rank_pattern", "modules_to_save"}
#: Fields used by ``load_peft``, per PEFT type; all others must hold a neutral value.
USED = {
    "LORA": {"r", "lora_alpha", "alpha_pattern", "use_dora", "use_rslora", "lora_dropout", "init_lora_weights"},
    "IA3": {"feedforward_modules", "init_ia3_weights"},
    "LOHA": {"r", "alpha", "alpha_pattern", "init_weights"},
    "LOKR": {"r", "alpha", "alpha_pattern", "decompose_both", "decompose_factor", "init_weights"},
    "OFT": {"r", "oft_block_size", "block_share", "use_cayley_neumann", "num_cayley_neumann_terms", "init_weights",
            "eps"},
    "LN_TUNING": set(),
    "VERA": {"r", "d_initial", "projection_prng_key", "save_projection", "vera_dropout", "init_weights"},
}
NEUTRAL = {"bias": "none", "megatron_core": "megatron.core", "qalora_group_size": 16, "fan_in_fan_out": False}
TENSORS = {  # PEFT tensor suffix -> our tuner attribute
    "LORA": {"lora_A.weight": "lora_A", "lora_B.weight": "lora_B", "lora_magnitude_vector": "magnitude"},
    "IA3": {"ia3_l": "scale"},
    "LOHA": {f"hada_w{i}_{x}": f"w{i}_{x}" for i in (1, 2) for x in "ab"},
    "LOKR": {f"lokr_{n}": n for n in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b")},
    "OFT": {"oft_R.weight": "weight"},
    "LN_TUNING": {"ln_tuning_layers.weight": "weight", "ln_tuning_layers.bias": "bias"},
    "VERA": {"vera_lambda_b": "lambda_b", "vera_lambda_d": "lambda_d"},
}
TUNER_OF = {"LORA": "lora", "IA3": "ia3", "LOHA": "loha", "LOKR": "lokr", "OFT": "oft", "LN_TUNING": "ln_tuning",
            "VERA": "vera"}
NO_PEFT_FORM = {  # tuner name -> why it cannot be written as a PEFT adapter next to other tuners
    "prompt": "PEFT's prompt tuning is an adapter type of its own (prompt at embed of an hf_text backbone with "
              "prompt_layout='first', alone or with a trained head)",
    "prefix": "PEFT's prefix tuning is an adapter type of its own (prefix at every attention of an hf_text backbone, "
              "alone or with a trained head)",
}


# Paths ------------------------------------------------------------------------------------------
class _Index:
    """Module path <-> site, by module identity in the wrapped model."""

    def __init__(self, backbone: Backbone) -> None:
        self.backbone = backbone
        self.path = {id(m): n for n, m in backbone.model.named_modules()}
        self.linear: dict[str, str] = {}  # module path -> linear site
        self.holder: dict[str, str] = {}  # module path -> most specific non-linear site holding it
        rank = {"block": 1}
        for spec in sorted(backbone.site_specs().values(), key=lambda s: rank.get(s.kind, 0)):
            handle = backbone.slot(spec.name).handle
            if spec.kind == "linear":
                self.linear[self.path[id(handle.linear)]] = spec.name
                continue
            for module in handle.modules.values():
                if isinstance(module, nn.Module):
                    for sub in module.modules():
                        if id(sub) in self.path:
                            self.holder.setdefault(self.path[id(sub)], spec.name)

    def linear_site(self, path: str) -> str:
        if path not in self.linear:
            raise PlacementError(f"PEFT adapts module {path!r}, which is not a linear site of this "
                                 f"{type(self.backbone).__name__} (linear modules: {sorted(self.linear)[:6]} ...)")
        return self.linear[path]

    def holder_site(self, path: str) -> str:
        if path not in self.holder:
            raise PlacementError(f"PEFT module {path!r} belongs to no site of this {type(self.backbone).__name__}")
        return self.holder[path]


def _pattern_value(pattern: dict[str, Any], path: str, default: Any) -> Any:
    """PEFT's ``rank_pattern``/``alpha_pattern`` lookup: a key matches a path ending in it."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


# Reading ----------------------------------------------------------------------------------------
def read_peft_folder(adapter_dir: str | Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """``(config, tensors)`` of a PEFT adapter folder; the legacy pickle format is refused."""
    from safetensors.torch import load_file

    folder = Path(adapter_dir)
    if not (folder / CONFIG).is_file():
        raise ConfigError(f"{str(folder)!r} is not a PEFT adapter folder: no {CONFIG}")
    if not (folder / WEIGHTS).is_file():
        why = (f"it holds the legacy {LEGACY}, a pickle that can run code when loaded; re-save it with "
               "PeftModel.save_pretrained(dir, safe_serialization=True)") if (folder / LEGACY).is_file() else \
            f"no {WEIGHTS}"
        raise ConfigError(f"Cannot read the PEFT adapter in {str(folder)!r}: {why}")
    return json.loads((folder / CONFIG).read_text()), load_file(str(folder / WEIGHTS))


def _check_fields(config: dict[str, Any]) -> str:
    kind = config.get("peft_type")
    if kind not in USED:
        raise ConfigError(f"PEFT type {kind!r} is not supported; supported: {sorted(USED) + list(prompts.KINDS)}")
    for field, value in config.items():
        if field in METADATA or field in USED[kind]:
            continue
        if field in NEUTRAL and value == NEUTRAL[field] or value in (None, False, 0, 0.0, "", [], {}):
            continue
        raise ConfigError(f"PEFT {kind} config field {field}={value!r} is not supported by utuning's reader; "
                          "refusing rather than ignoring it")
    return kind


def _lora_spec(config: dict, path: str, site_split: int, tensors: dict[str, Tensor]) -> tuple[str, dict]:
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init not in ("gaussian", "pissa", "olora"):
        raise ConfigError(f"PEFT LoRA init_lora_weights={init!r} is not supported (only True, False, 'gaussian', "
                          "'pissa', 'olora')")
    rank = tensors["lora_A"].shape[0]
    args = {"rank": rank, "alpha": _pattern_value(config.get("alpha_pattern") or {}, path, config.get("lora_alpha", 8)),
            "rslora": bool(config.get("use_rslora")), "dropout": config.get("lora_dropout") or 0.0,
            "init": init if init in ("pissa", "olora") else "default"}
    if site_split > 1:
        args["fused"] = True
    return ("dora" if config.get("use_dora") else "lora"), args


def _spec(kind: str, config: dict, path: str, site: Any, tensors: dict[str, Tensor]) -> tuple[str, dict]:
    if kind == "LORA":
        return _lora_spec(config, path, site.info.get("split", 1), tensors)
    if kind == "IA3":
        return "ia3", {"feedforward": tensors["scale"].shape[0] == 1}
    if kind in ("LOHA", "LOKR"):
        rank = _pattern_value(config.get("rank_pattern") or {}, path, config.get("r", 8))
        args = {"rank": rank, "alpha": _pattern_value(config.get("alpha_pattern") or {}, path, config.get("alpha", 8))}
        if kind == "LOKR":
            args.update(decompose_both=bool(config.get("decompose_both")),
                        decompose_factor=config.get("decompose_factor", -1))
        return kind.lower(), args
    if kind == "OFT":
        n, elements = tensors["weight"].shape
        block = (1 + math.isqrt(1 + 8 * elements)) // 2  # elements = b(b-1)/2
        share = bool(config.get("block_share"))
        return "oft", {"block_size": block, "block_share": share,
                       "cayley": "neumann" if config.get("use_cayley_neumann", True) else "exact",
                       "neumann_terms": config.get("num_cayley_neumann_terms", 5)}
    return "vera", {"rank": tensors["lambda_d"].shape[0], "d_initial": config.get("d_initial", 0.1),
                    "dropout": config.get("vera_dropout") or 0.0, "projection_seed": config.get("projection_prng_key", 0)}


def _group(kind: str, tensors: dict[str, Tensor], index: _Index) -> tuple[dict, dict[str, Tensor], dict[str, Tensor]]:
    """Tensors by module path and our attribute, the rest (modules_to_save), and top-level ones (VeRA's A/B)."""
    by_path: dict[str, dict[str, Tensor]] = {}
    rest, top = {}, {}
    for key, t in tensors.items():
        if not key.startswith(PREFIX):
            top[key.removeprefix("base_model.")] = t
            continue
        name = key[len(PREFIX):]
        for suffix, attr in TENSORS[kind].items():
            if name.endswith("." + suffix):
                by_path.setdefault(name[: -len(suffix) - 1], {})[attr] = t
                break
        else:
            rest[name] = t
    return by_path, rest, top


def load_peft(model: Backbone | nn.Module, adapter_dir: str | Path, *, shift_positions: bool = False) -> TunedModel:
    """Read a PEFT adapter folder onto ``model`` (the same base model PEFT adapted: a timm ViT or an
    HF encoder, raw or wrapped) and return a ``TunedModel`` whose outputs equal PEFT's. LN tuning and
    ``modules_to_save`` weights are copied into the model's own modules, which become trainable.

    shift_positions: for ``PREFIX_TUNING``, shift the input's absolute positions by the prefix
        length, as HF's BERT does under PEFT's ``past_key_values`` (``utuning.peft_prompts``)."""
    config, tensors = read_peft_folder(adapter_dir)
    if config.get("peft_type") in prompts.KINDS:
        return prompts.load_prompt_learning(model, config, tensors, shift_positions=shift_positions)
    if shift_positions:
        raise ConfigError(f"shift_positions applies to PEFT PREFIX_TUNING adapters, not {config.get('peft_type')}")
    kind = _check_fields(config)
    backbone = wrap(model)
    index = _Index(backbone)
    by_path, rest, top = _group(kind, tensors, index)
    specs, loads = [], []  # loads: (site, tuner name, {attr: tensor}) copied after attaching
    site_specs = backbone.site_specs()
    vera_sites = []
    for path, parts in by_path.items():
        if kind == "LN_TUNING":
            loads.append(("ln", path, parts))
            continue
        site = index.linear_site(path)
        name, args = _spec(kind, config, path, site_specs[site], parts)
        if name == "vera":
            vera_sites.append(site)
            vera_args = args
        else:
            specs.append({"name": name, "at": site, "args": args})
        loads.append((site, name, parts))
    if vera_sites:
        specs.append({"name": "vera", "at": vera_sites, "args": vera_args})
    ln_sites = sorted({index.holder_site(p) for _, p, _ in (x for x in loads if x[0] == "ln")})
    if ln_sites:
        specs.append({"name": "ln_tuning", "at": ln_sites})
    saved_modules = _modules_to_save(rest, config, index)
    owners = {p.rsplit(".", 1)[0] for p in saved_modules}
    full_sites = sorted({index.linear[m] if m in index.linear else index.holder_site(m) for m in owners})
    specs += [{"name": "full", "at": s} for s in full_sites]
    tuned = tune(backbone, specs)
    tuners = {(s, a.tuner.name): a.tuner for a in tuned.attached() for s in a.sites}
    copies = []  # (target, value, what): every shape is checked before anything is copied
    for site, name, parts in loads:
        owner = backbone.model.get_submodule(name) if site == "ln" else tuners[(site, name)]
        copies += [(getattr(owner, attr), t if site == "ln" else _to_ours(name, attr, t), f"{site}.{name}.{attr}")
                   for attr, t in parts.items()]
    for key, t in top.items():  # VeRA's shared projections
        if not vera_sites or key not in ("vera_A", "vera_B"):
            raise StateDictError(f"PEFT tensor {key!r} has no counterpart in the loaded model")
        copies.append((getattr(tuners[(vera_sites[0], "vera")].shared, key), t, key))
    copies += [(backbone.model.get_parameter(path), t, path) for path, t in saved_modules.items()]
    copy_fitting(copies)
    return tuned


def _modules_to_save(rest: dict[str, Tensor], config: dict, index: _Index) -> dict[str, Tensor]:
    """Parameters saved whole (``modules_to_save``), by parameter path; anything else is refused."""
    names = [n for n in (config.get("modules_to_save") or [])]
    out, unknown = {}, []
    params = dict(index.backbone.model.named_parameters())
    for name, t in rest.items():
        name = name.replace(".modules_to_save.default.", ".")
        parts = name.split(".")[:-1]
        owners = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]  # the module and its parents
        if name in params and any(m == n or m.endswith("." + n) for m in owners for n in names):
            out[name] = t
        else:
            unknown.append(name)
    if unknown:
        raise StateDictError(f"PEFT adapter tensors that fit no module of this model: {unknown[:6]}")
    return out


def _to_ours(name: str, attr: str, t: Tensor) -> Tensor:
    if name in ("lora", "dora") and attr in ("lora_A", "lora_B"):
        return t[None]  # (1, r, D_in) / (1, D_out, r): one pair over the whole layer
    if name == "ia3":
        return t.flatten()
    return t


# Writing ----------------------------------------------------------------------------------------
def export_peft(model: nn.Module, out_dir: str | Path, *, base_model_name_or_path: str | None = None) -> Path:
    """Write ``model``'s tuners as a PEFT adapter folder that ``PeftModel.from_pretrained(base, out_dir)``
    loads with equal outputs. One PEFT type per folder (plus ``modules_to_save`` for ``full`` or a
    plain ``linear_probe`` head); tuners without a PEFT form are refused by name with the reason."""
    from safetensors.torch import save_file

    tuned = unwrap(model)
    if any(a.tuner.merged for a in tuned.attached()):
        raise ConfigError("Unmerge the tuners before exporting a PEFT adapter (model.unmerge())")
    if any(a.tuner.name in prompts.TUNERS for a in tuned.attached()) and all(
            a.tuner.name in (*prompts.TUNERS, "full", "linear_probe") for a in tuned.attached()):
        config, tensors = prompts.collect_prompt_learning(tuned)
    else:
        config, tensors = _collect(tuned, _Index(tuned.backbone))
    config["base_model_name_or_path"] = base_model_name_or_path
    config = _known_fields(config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(out / WEIGHTS))
    (out / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out


def _known_fields(config: dict[str, Any]) -> dict[str, Any]:
    """Drop nothing silently: with PEFT installed, a field its config class lacks is an error."""
    try:
        import peft
    except ImportError:
        return config
    known = {f.name for f in dataclasses.fields(peft.PEFT_TYPE_TO_CONFIG_MAPPING[config["peft_type"]])}
    missing = sorted(set(config) - known)
    if missing:
        raise UtuningError(f"The installed peft {peft.__version__} does not know config fields {missing} "
                           f"of a {config['peft_type']} adapter; upgrade peft to read this export")
    return config


KIND_OF = {"lora": "LORA", "dora": "LORA", "ia3": "IA3", "loha": "LOHA", "lokr": "LOKR", "oft": "OFT",
           "ln_tuning": "LN_TUNING", "vera": "VERA"}


def _regex(paths: list[str]) -> str:
    """A ``target_modules`` string PEFT full-matches: exactly these module paths."""
    return "^(?:" + "|".join(re.escape(p) for p in sorted(paths)) + ")$"


def _one(values: dict[str, Any], what: str) -> Any:
    if len(set(map(repr, values.values()))) > 1:
        raise ConfigError(f"PEFT holds one {what} per adapter; the tuners differ: {values}")
    return next(iter(values.values()))


def _collect(tuned: TunedModel, index: _Index) -> tuple[dict[str, Any], dict[str, Tensor]]:
    from utuning.tuners.ln_tuning import norm_parameters

    adapters, saved = [], {}  # saved: module path -> module, for modules_to_save
    for a in tuned.attached():
        name = a.tuner.name
        if name == "full" or (name == "linear_probe" and index.backbone.site_specs()[a.sites[0]].kind == "head"):
            saved.update(_saved_modules(a, index))
        elif name in KIND_OF:
            adapters.append(a)
        else:
            why = NO_PEFT_FORM.get(name, f"HF PEFT has no {name!r} adapter")
            raise ConfigError(f"Tuner {name!r} at {a.sites[0]!r} has no PEFT form: {why}")
    kinds = {KIND_OF[a.tuner.name] for a in adapters}
    if len(kinds) != 1:
        raise ConfigError(f"A PEFT adapter folder holds one adapter type (plus modules_to_save); this model has "
                          f"{sorted(kinds) or 'none'}: {sorted({a.tuner.name for a in adapters})}")
    kind = kinds.pop()
    config: dict[str, Any] = {"peft_type": kind, "task_type": None, "inference_mode": True}
    tensors: dict[str, Tensor] = {}
    paths, ranks, alphas, extra = [], {}, {}, {}
    for a in adapters:
        t = a.tuner
        if kind == "LN_TUNING":
            for pname, p in norm_parameters(a.handle).items():
                module = index.path[id(_owner(index.backbone.model, p))]
                tensors[f"{PREFIX}{module}.ln_tuning_layers.{pname.rsplit('.', 1)[1]}"] = p
                paths.append(module)
            continue
        path = index.path[id(a.handle.linear)]
        paths.append(path)
        key = f"{PREFIX}{path}."
        if kind == "LORA":
            down, up = t.down_weight(), t.up_weight()
            tensors[key + "lora_A.weight"], tensors[key + "lora_B.weight"] = down, up
            ranks[path], alphas[path] = down.shape[0], t.scaling * down.shape[0]
            extra[path] = (t.name == "dora", t.dropout.p)
            if t.name == "dora":
                tensors[key + "lora_magnitude_vector"] = t.magnitude
        elif kind == "IA3":
            vec = t.vector()
            tensors[key + "ia3_l"] = vec[None, :] if t.feedforward else vec[:, None]
            extra[path] = t.feedforward
        elif kind in ("LOHA", "LOKR"):
            for suffix, attr in TENSORS[kind].items():
                if isinstance(getattr(t, attr, None), nn.Parameter):
                    tensors[key + suffix] = getattr(t, attr)
            ranks[path], alphas[path] = t.rank, t.scaling * t.rank
            extra[path] = (t.decompose_both, t.decompose_factor) if kind == "LOKR" else None
        elif kind == "OFT":
            tensors[key + "oft_R.weight"] = t.weight
            extra[path] = (t.block_size, t.weight.shape[0] == 1 and t.blocks > 1, t.cayley, t.neumann_terms)
        else:  # VERA
            tensors[key + "vera_lambda_b"], tensors[key + "vera_lambda_d"] = t.lambda_b, t.lambda_d
            tensors["base_model.vera_A"], tensors["base_model.vera_B"] = t.shared.vera_A, t.shared.vera_B
            extra[path] = (t.lambda_d.shape[0], t.dropout.p)
    config["target_modules"] = _regex(paths)
    if kind == "LORA":
        dora, dropout = _one(extra, "use_dora / lora_dropout")
        config.update(use_dora=dora, lora_dropout=dropout, use_rslora=False, init_lora_weights=True)
        _patterns(config, ranks, alphas, "r", "lora_alpha")
    elif kind == "IA3":
        config["feedforward_modules"] = _regex([p for p, ff in extra.items() if ff]) if any(extra.values()) else []
    elif kind in ("LOHA", "LOKR"):
        _patterns(config, ranks, alphas, "r", "alpha")
        if kind == "LOKR":
            config["decompose_both"], config["decompose_factor"] = _one(extra, "decompose_both / decompose_factor")
    elif kind == "OFT":
        block, share, cayley, terms = _one(extra, "oft_block_size / block_share / cayley form")
        config.update(r=0, oft_block_size=block, block_share=share, use_cayley_neumann=cayley == "neumann",
                      num_cayley_neumann_terms=terms)
    elif kind == "VERA":
        seeds = {a.sites[0]: a.tuner.shared for a in adapters}
        if len({id(s) for s in seeds.values()}) > 1:
            raise ConfigError("PEFT's VeRA shares one pair of projections per adapter; this model has several")
        rank, dropout = _one(extra, "VeRA rank / dropout")
        config.update(r=rank, vera_dropout=dropout, save_projection=True, projection_prng_key=0)
    if saved:
        config["modules_to_save"] = sorted(saved)
        for path, params in saved.items():
            for pname, p in params.items():
                tensors[f"{PREFIX}{path}.{pname}"] = p
    return config, tensors


def _patterns(config: dict, ranks: dict, alphas: dict, r_field: str, alpha_field: str) -> None:
    """One global rank/alpha (the most common) and ``rank_pattern``/``alpha_pattern`` for the rest."""
    r = max(set(ranks.values()), key=list(ranks.values()).count)
    alpha = max(set(alphas.values()), key=list(alphas.values()).count)
    config[r_field], config[alpha_field] = r, alpha
    config["rank_pattern"] = {"^" + re.escape(p): v for p, v in ranks.items() if v != r}
    config["alpha_pattern"] = {"^" + re.escape(p): v for p, v in alphas.items() if v != alpha}


def _owner(model: nn.Module, param: nn.Parameter) -> nn.Module:
    for module in model.modules():
        if any(p is param for p in module.parameters(recurse=False)):
            return module
    raise ConfigError("A LayerNorm parameter outside the model")


def _saved_modules(a: Any, index: _Index) -> dict[str, dict[str, Tensor]]:
    """``modules_to_save`` entries of a ``full`` tuner (its operation's modules) or of a
    ``linear_probe`` replacing a plain linear head."""
    modules = {k: m for k, m in a.handle.modules.items() if m is not None}
    loose = [k for k, m in modules.items() if not isinstance(m, nn.Module)]
    if loose:
        raise ConfigError(f"full at {a.sites[0]!r} trains loose parameters {loose}, which PEFT's modules_to_save "
                          "(whole modules) cannot hold")
    if a.tuner.name == "full":
        return {index.path[id(m)]: dict(m.named_parameters()) for m in modules.values()
                if next(m.parameters(), None) is not None}
    linear = [m for m in modules.values() if isinstance(m, nn.Linear)]
    fc = a.tuner.fc
    if len(modules) != 1 or len(linear) != 1 or linear[0].weight.shape != fc.weight.shape:
        raise ConfigError(f"linear_probe at {a.sites[0]!r} replaces {sorted(modules)}, not one linear layer of its "
                          "shape, which PEFT's modules_to_save cannot express; train the head with 'full' instead")
    return {index.path[id(linear[0])]: dict(fc.named_parameters())}


def copy_fitting(copies: list[tuple[Tensor, Tensor, str]]) -> None:
    """Copy each (target, value, what) after checking every shape first: a misfit copies nothing."""
    bad = [f"{what}: adapter {tuple(v.shape)} vs model {tuple(t.shape)}" for t, v, what in copies if t.shape != v.shape]
    if bad:
        raise StateDictError(f"PEFT tensors that do not fit this model (was the adapter trained on it?): {bad[:6]}")
    with torch.no_grad():
        for target, value, _ in copies:
            target.copy_(value.to(target.dtype))

