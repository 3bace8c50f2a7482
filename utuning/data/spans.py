"""Token-level text tasks from local files: sequence labelling (``token_classification``) and
extractive question answering (``extractive_qa``). Both need a fast tokenizer (word ids and
character offsets)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from utuning.data.base import IGNORE_INDEX, register_dataset
from utuning.data.text import (
    TextDataset,
    encode_label,
    infer_label_names,
    read_records,
    resolve_tokenizer,
    sibling_files,
    split_file,
    tokenizer_identity,
)
from utuning.errors import ConfigError, closest


def _fast(tok: Any, name: str) -> Any:
    if not getattr(tok, "is_fast", False):
        raise ConfigError(f"Dataset {name!r} needs a fast (Rust) tokenizer for word ids and offsets; "
                          f"got {type(tok).__name__}")
    return tok


def _check_keys(name: str, rows: list, keys: Sequence[str]) -> None:
    for i, row in enumerate(rows):
        for k in keys:
            if k not in row:
                raise ConfigError(f"Dataset {name!r}: row {i} has no key {k!r}; it has {sorted(row)} "
                                  f"(closest: {closest(k, row)})")


@register_dataset("token_classification")
def token_classification(*, split: str, backbone: Any = None, root: str | None = None,
                         data_files: Mapping[str, str] | None = None, tokens_key: str = "tokens",
                         tags_key: str = "tags", label_names: Sequence[str] | None = None, max_length: int = 128,
                         tokenizer: Any = None, subset: int | None = None, subset_mode: str = "first") -> TextDataset:
    """Sequence labelling (e.g. BIO named entities): JSON lines with a list of words (``tokens``)
    and one tag per word (``tags``, names or ids). Each word's tag goes on its first sub-token;
    later sub-tokens, special and pad tokens get -100. String tags without ``label_names`` are
    named in sorted order of all tags in the split files next to this one."""
    name = "token_classification"
    tok = _fast(resolve_tokenizer(backbone, tokenizer), name)
    path = split_file(name, root, split, data_files)
    if label_names is None:
        files = list(data_files.values()) if data_files else sibling_files(path)
        label_names = infer_label_names(files, tags_key, nested=True)
    rows = read_records(path)
    _check_keys(name, rows, (tokens_key, tags_key))
    words = [[str(w) for w in r[tokens_key]] for r in rows]
    enc = tok(words, is_split_into_words=True, truncation=True, max_length=max_length)
    labels = []
    for i, row in enumerate(rows):
        tags = row[tags_key]
        if len(tags) != len(words[i]):
            raise ConfigError(f"Dataset {name!r} {str(path)!r} row {i}: {len(words[i])} tokens but {len(tags)} tags")
        ids = [encode_label(t, label_names, f"Dataset {name!r} row {i}") for t in tags]
        seq, previous = [], None
        for w in enc.word_ids(batch_index=i):
            seq.append(IGNORE_INDEX if w is None or w == previous else ids[w])
            previous = w
        labels.append(seq)
    num_classes = len(label_names) if label_names else max((max(s) for s in labels if s), default=0) + 1
    return TextDataset(
        encodings=enc, labels=labels, tokenizer=tok, name=name, split=split, task="labelling",
        num_classes=num_classes, metrics=["seq_f1", "token_accuracy"], label_names=label_names, files=[path],
        identity={"tokens_key": tokens_key, "tags_key": tags_key, "max_length": max_length, **tokenizer_identity(tok)},
        subset=subset, subset_mode=subset_mode,
    )


def _answers(row: Mapping[str, Any]) -> list[tuple[str, int]]:
    """(text, char start) pairs of SQuAD's ``{"text": [...], "answer_start": [...]}`` or a list of dicts."""
    ans = row.get("answers") or []
    if isinstance(ans, Mapping):
        return list(zip(ans.get("text", []), ans.get("answer_start", [])))
    return [(a["text"], a["answer_start"]) for a in ans]


def _flatten_squad(rows: list) -> list:
    """Rows of the original SQuAD JSON (articles -> paragraphs -> qas) as flat question rows."""
    if not rows or "paragraphs" not in rows[0]:
        return rows
    return [{"context": p["context"], "question": q["question"], "answers": q.get("answers", [])}
            for article in rows for p in article["paragraphs"] for q in p["qas"]]


def answer_tokens(offsets: Sequence[tuple[int, int]], sequence_ids: Sequence[int | None], start_char: int,
                  end_char: int, context_id: int = 1) -> tuple[int, int]:
    """Token indices of the answer characters [start_char, end_char); (0, 0) if it was truncated away."""
    ctx = [i for i, s in enumerate(sequence_ids) if s == context_id]
    if not ctx or offsets[ctx[0]][0] > start_char or offsets[ctx[-1]][1] < end_char:
        return 0, 0
    start = next(i for i in ctx if offsets[i][1] > start_char)
    end = next(i for i in reversed(ctx) if offsets[i][0] < end_char)
    return start, end


@register_dataset("extractive_qa")
def extractive_qa(*, split: str, backbone: Any = None, root: str | None = None,
                  data_files: Mapping[str, str] | None = None, question_key: str = "question",
                  context_key: str = "context", max_length: int = 384, tokenizer: Any = None,
                  subset: int | None = None, subset_mode: str = "first") -> TextDataset:
    """SQuAD-style extractive QA: rows with context, question and answers (``{"text": [...],
    "answer_start": [...]}`` character offsets; the first answer is the target). Inputs are
    ``[CLS] question [SEP] context [SEP]`` truncated (context only) to ``max_length``; labels are a
    (2,) long tensor [start, end] of token indices (end inclusive). Unanswerable questions, and
    answers cut off by truncation, point at token 0 (the class token). ``num_classes`` is 2: a
    model scores every token as answer start and as answer end."""
    name = "extractive_qa"
    tok = _fast(resolve_tokenizer(backbone, tokenizer), name)
    path = split_file(name, root, split, data_files)
    rows = _flatten_squad(read_records(path))
    _check_keys(name, rows, (question_key, context_key))
    enc = tok([str(r[question_key]) for r in rows], [str(r[context_key]) for r in rows], truncation="only_second",
              max_length=max_length, return_offsets_mapping=True)
    labels = []
    for i, row in enumerate(rows):
        answers = _answers(row)
        if not answers:
            labels.append([0, 0])
            continue
        text, start_char = answers[0]
        labels.append(list(answer_tokens(enc["offset_mapping"][i], enc.sequence_ids(i), int(start_char),
                                         int(start_char) + len(text))))
    return TextDataset(
        encodings=enc, labels=labels, tokenizer=tok, name=name, split=split, task="qa", num_classes=2,
        metrics=["qa_f1", "qa_exact"], files=[path], subset=subset, subset_mode=subset_mode,
        identity={"question_key": question_key, "context_key": context_key, "max_length": max_length,
                  **tokenizer_identity(tok)},
    )
