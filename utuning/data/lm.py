"""Causal language modelling data and loss: JSON-lines rows ``{prompt, completion}`` or ``{text}``.

Each row is tokenized once, at build time, with the backbone's tokenizer. ``{prompt, completion}``
rows train on the completion only: prompt tokens get the label -100 (``IGNORE_INDEX``), so neither
the loss nor the metrics count them; the completion is followed by the end-of-sequence token
(``append_eos``). ``{text}`` rows train on every token. Rows longer than ``max_length`` lose
prompt tokens from the left first, so that the completion survives.

Items::

    {"inputs": {"input_ids": (N,) long, "attention_mask": (N,) long}, "labels": (N,) long}

``labels[t]`` is the token at position t (or -100); the model's logits at position t predict
token t + 1, so ``lm_loss`` shifts by one (as HF's ``ForCausalLMLoss``). Batches are right-padded
by ``collate`` (labels with -100); the decoder backbone counts positions over real tokens, so
padding side does not change the loss.

The task ``causal_lm`` is registered here: loss ``lm_loss``, predictions ``lm_predictions`` (the
arg-max next token against the shifted labels), metric ``token_accuracy``. Sequence classification
on a decoder uses ``text_classification`` (``utuning.data.text``) unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from utuning.data.base import ItemDataset, register_dataset
from utuning.data.text import read_records, resolve_tokenizer, split_file, tokenizer_identity
from utuning.errors import ConfigError, closest
from utuning.tasks import IGNORE_INDEX, Task, register_task


def lm_loss(logits: Tensor, labels: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Mean next-token cross-entropy over labelled positions: logits (B, N, V), labels (B, N)."""
    logits = logits[:, :-1].float()  # position t predicts token t + 1
    target = labels[:, 1:].long()
    if not (target != IGNORE_INDEX).any():
        return logits.sum() * 0.0  # no completion token in the batch: a zero that keeps the graph
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE_INDEX,
                           label_smoothing=label_smoothing)


def lm_predictions(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Arg-max next tokens (B, N-1) and the tokens they should be (B, N-1), -100 where not counted."""
    return logits[:, :-1].argmax(-1), labels[:, 1:]


CAUSAL_LM = register_task("causal_lm")(Task(
    loss=lambda o, y, s: lm_loss(o, y, s), predictions=lm_predictions, metrics=("token_accuracy",),
    pad_outputs=0.0, pad_labels=IGNORE_INDEX))


class LMDataset(ItemDataset):
    """Tokenized rows: ``input_ids`` and ``labels`` lists (labels -100 on prompt tokens)."""

    task = "causal_lm"

    def __init__(self, *, ids: list[list[int]], labels: list[list[int]], tokenizer: Any, subset: int | None,
                 **kwargs: Any) -> None:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id or 0
        super().__init__(pad_token_id=pad, num_classes=None, **kwargs)
        self.tokenizer, self.ids, self.labels = tokenizer, ids, labels
        self.select(len(ids), subset=subset)

    def example(self, j: int) -> dict[str, Any]:
        ids = torch.tensor(self.ids[j], dtype=torch.long)
        return {"inputs": {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                "labels": torch.tensor(self.labels[j], dtype=torch.long)}


def apply_templates(row: Mapping[str, Any], prompt_template: str | None, completion_template: str | None,
                    prompt_key: str, completion_key: str, where: str) -> Mapping[str, Any]:
    """``{prompt, completion}`` made from any row by ``str.format`` templates over its fields, e.g.
    ``"Review: {text}\\nSentiment:"`` and ``" {label}"`` turn a classification file into completions."""
    if prompt_template is None and completion_template is None:
        return row
    try:
        made = dict(row)
        if prompt_template is not None:
            made[prompt_key] = prompt_template.format(**row)
        if completion_template is not None:
            made[completion_key] = completion_template.format(**row)
        return made
    except KeyError as e:
        raise ConfigError(f"{where}: template field {e} is not in the row; it has {sorted(row)} "
                          f"(closest: {closest(str(e.args[0]), row)})") from None


def encode_row(tokenizer: Any, row: Mapping[str, Any], *, prompt_key: str, completion_key: str, text_key: str,
               max_length: int, append_eos: bool, where: str) -> tuple[list[int], list[int]]:
    """Token ids and labels of one row (prompt tokens labelled -100)."""
    eos = [tokenizer.eos_token_id] if append_eos and tokenizer.eos_token_id is not None else []
    if completion_key in row:
        prompt = tokenizer(str(row.get(prompt_key) or ""))["input_ids"]  # special tokens (e.g. BOS) included
        completion = tokenizer(str(row[completion_key]), add_special_tokens=False)["input_ids"] + eos
        completion = completion[:max_length]
        prompt = prompt[max(0, len(prompt) + len(completion) - max_length):]
        return prompt + completion, [IGNORE_INDEX] * len(prompt) + completion
    if text_key in row:
        ids = (tokenizer(str(row[text_key]))["input_ids"] + eos)[:max_length]
        return ids, list(ids)
    keys = [completion_key, text_key]
    raise ConfigError(f"{where} has neither {completion_key!r} (with {prompt_key!r}) nor {text_key!r}; it has "
                      f"{sorted(row)} (closest: {closest(keys[0], row) or closest(keys[1], row)})")


@register_dataset("causal_lm")
def causal_lm(*, split: str, backbone: Any = None, root: str | None = None, data_files: Mapping[str, str] | None = None,
              prompt_key: str = "prompt", completion_key: str = "completion", text_key: str = "text",
              prompt_template: str | None = None, completion_template: str | None = None,
              max_length: int = 256, append_eos: bool = True, tokenizer: Any = None,
              subset: int | None = None) -> LMDataset:
    """Local ``<root>/<split>.jsonl`` (or .json/.csv/.tsv) rows for causal LM fine-tuning; with
    ``prompt_template`` / ``completion_template`` the prompt and completion are formatted from the
    row's fields (``str.format``), so any local table becomes completion data."""
    if not isinstance(max_length, int) or max_length < 2:
        raise ConfigError(f"max_length={max_length!r} must be an integer >= 2 (a token and the one it predicts)")
    tok = resolve_tokenizer(backbone, tokenizer)
    path = split_file("causal_lm", root, split, data_files)
    ids, labels, locations = [], [], []
    for i, row in enumerate(read_records(path)):
        where = f"{path}:{i + 1}"
        row = apply_templates(row, prompt_template, completion_template, prompt_key, completion_key, where)
        x, y = encode_row(tok, row, prompt_key=prompt_key, completion_key=completion_key, text_key=text_key,
                          max_length=max_length, append_eos=append_eos, where=where)
        ids.append(x)
        labels.append(y)
        locations.append(where)
    if not ids:
        raise ConfigError(f"Dataset 'causal_lm': {str(path)!r} has no rows")
    return LMDataset(
        ids=ids, labels=labels, tokenizer=tok, subset=subset, name="causal_lm", split=split,
        metrics=["token_accuracy"], files=[path], locations=locations,
        identity={"prompt_key": prompt_key, "completion_key": completion_key, "text_key": text_key,
                  "prompt_template": prompt_template, "completion_template": completion_template, "max_length": max_length, "append_eos": append_eos, **tokenizer_identity(tok)},
    )
