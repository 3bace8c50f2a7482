"""Text generation with a tuned decoder LLM and its KV cache.

``generate(model, tokenizer, prompts, max_new_tokens)`` left-pads the prompts, runs them once
(the first chunk fills the cache, with any prompt-tuning tokens and prefix keys/values of the
tuners), then feeds one token per step. Tuners act at every step: prompts and prefixes through
the cache, LoRA and adapters on each new token. Greedy decoding (the default) gives the same tokens
as Hugging Face ``generate`` on the untuned model and on a model whose LoRA is merged. Sampling:
``do_sample=True`` with ``temperature``, ``top_k`` and ``top_p`` (nucleus, Holtzman et al. 2019,
arXiv 1904.09751), reproducible with ``seed``.

``generate_main(recipe_path, checkpoint, prompt, ...)`` is what ``utuning generate`` runs: the model
a checkpoint was trained as (its stored recipe), or a recipe's untrained model, generating for one
or more prompts.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from utuning.errors import ConfigError


def decoder_of(model: nn.Module) -> nn.Module:
    """The decoder backbone of a ``TunedModel`` (or the backbone itself), checked to be a causal LM."""
    from utuning.model import TunedModel, unwrap

    tuned = unwrap(model) if not hasattr(model, "new_cache") else None
    backbone = tuned.backbone if isinstance(tuned, TunedModel) else model
    if isinstance(tuned, TunedModel) and len(tuned.side):
        raise ConfigError("This model's outputs come from side tuners (class scores), not next-token logits; "
                          "generate needs a causal LM without side tuners")
    if not hasattr(backbone, "new_cache") or getattr(backbone, "task", None) != "causal_lm":
        raise ConfigError(f"generate needs a causal language model (backbone 'hf_decoder' with task='causal_lm'); "
                          f"got a {type(backbone).__name__} with task {getattr(backbone, 'task', None)!r}")
    return backbone


def next_token(logits: Tensor, *, do_sample: bool, temperature: float, top_k: int, top_p: float,
               generator: torch.Generator | None) -> Tensor:
    """(B, V) scores -> (B,) token ids: arg-max, or a sample after temperature, top-k and top-p."""
    if not do_sample:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest set whose mass reaches top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate_ids(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None = None, *,
                 max_new_tokens: int = 32, do_sample: bool = False, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, eos_token_id: int | Sequence[int] | None = None, pad_token_id: int = 0,
                 seed: int | None = None) -> Tensor:
    """New token ids (B, T <= max_new_tokens) for left-padded ``input_ids`` (B, N); rows that
    produced an end-of-sequence token are filled with ``pad_token_id`` after it."""
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens={max_new_tokens!r} must be a positive integer")
    if do_sample and not temperature > 0:
        raise ConfigError(f"temperature={temperature!r} must be > 0 when sampling")
    if not 0 < top_p <= 1:
        raise ConfigError(f"top_p={top_p!r} must be in (0, 1]")
    backbone = decoder_of(model)
    if attention_mask is not None and attention_mask.shape[1] and not attention_mask[:, -1].all():
        raise ConfigError("generate needs left-padded prompts (every row's last token real): pad on the left")
    was_training = backbone.training
    backbone.eval()
    eos = torch.tensor([] if eos_token_id is None else
                       [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id), device=input_ids.device)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=input_ids.device).manual_seed(seed)
    cache = backbone.new_cache()
    logits = backbone(input_ids, attention_mask, cache=cache, last_only=True)[:, -1]  # (B, V)
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    out = []
    try:
        for step in range(max_new_tokens):
            token = next_token(logits, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                               generator=generator).masked_fill(done, pad_token_id)  # (B,)
            out.append(token)
            done = done | torch.isin(token, eos)
            if done.all() or step == max_new_tokens - 1:
                break
            logits = backbone(token[:, None], torch.ones_like(token[:, None]), cache=cache, last_only=True)[:, -1]
    finally:
        backbone.train(was_training)
    return torch.stack(out, dim=1)


def generate(model: nn.Module, tokenizer: Any, prompts: str | Sequence[str], max_new_tokens: int = 32,
             **kwargs: Any) -> list[str]:
    """Completions (decoded new tokens, special tokens skipped) of each prompt; ``kwargs`` as in ``generate_ids``."""
    single = isinstance(prompts, str)
    texts = [prompts] if single else list(prompts)
    if not texts:
        raise ConfigError("generate got no prompts")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ConfigError("The tokenizer has neither a pad nor an end-of-sequence token to pad prompts with")
    enc = tokenizer(texts, padding=True, padding_side="left", return_tensors="pt")
    device = next(decoder_of(model).parameters()).device
    kwargs.setdefault("eos_token_id", tokenizer.eos_token_id)
    kwargs.setdefault("pad_token_id", pad)
    ids = generate_ids(model, enc["input_ids"].to(device), enc["attention_mask"].to(device),
                       max_new_tokens=max_new_tokens, **kwargs)
    return tokenizer.batch_decode(ids, skip_special_tokens=True)


def generate_main(recipe_path: str | Path | None, checkpoint: str | Path | None, prompt: str | Sequence[str], *,
                  max_new_tokens: int = 32, overrides: Sequence[str] = (), **kwargs: Any) -> list[str]:
    """``utuning generate``: the checkpoint's model (rebuilt from the recipe stored with it, tuner
    weights loaded), or with no checkpoint the recipe's model as built (untrained tuners); with both,
    the recipe is checked against the checkpoint's before its weights are loaded."""
    from utuning.build import build_model
    from utuning.checkpoint import load_into, load_tuned
    from utuning.recipe.load import load_recipe

    if recipe_path is None and checkpoint is None:
        raise ConfigError("generate needs a recipe, a checkpoint, or both")
    if recipe_path is None:
        model = load_tuned(checkpoint)
    else:
        recipe = load_recipe(recipe_path, overrides)
        model = build_model(recipe)
        if checkpoint is not None:
            load_into(model, checkpoint, recipe)
    backbone = decoder_of(model)
    if getattr(backbone, "tokenizer", None) is None:
        raise ConfigError("The recipe's backbone has no tokenizer (backbone.args.tokenizer is false, or the model "
                          "is a bare model type); give a model folder with a tokenizer")
    return generate(model.eval(), backbone.tokenizer, prompt, max_new_tokens, **kwargs)
