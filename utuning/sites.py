"""Sites: the named frozen operations a backbone exposes, and the patterns that select them.

Site names are the same for every backbone::

    embed                      token embeddings (patch or word embeddings, with class tokens)
    blocks.{i}                 a whole transformer block (OP = Block)
    blocks.{i}.attn            the MHA operation (ViT: norm -> attention -> layer scale)
    blocks.{i}.mlp             the FFN operation
    blocks.{i}.attn.qkv ...    linear layers inside them (qkv / q / k / v, proj, fc1, fc2)
    (conv sites)               convolutions, on models wrapped by module path (the generic adapter)
    norm                       the final norm
    head                       the classifier

Patterns are globs over dot-separated segments: ``*`` is one segment, ``**`` any number of
segments, ``{0..3}`` a range of layers and ``{0,5,11}`` a choice. ``blocks.*.attn`` is every
MHA operation; ``blocks.{0..0}.attn`` (or ``blocks.0.attn``) is the first one only.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from utuning.errors import SiteError, closest

SITE_KINDS = ("embed", "block", "attn", "mlp", "linear", "conv", "norm", "head")


@dataclass(frozen=True)
class SiteSpec:
    """Static description of one site, given by the backbone adapter.

    ``placements`` are the placements the site offers; ``refused`` maps a placement the site
    cannot take to the reason (shown in the error). ``features`` lists what the site's operation
    handle can do for tuners (``query``: the frozen query projection; ``key_value``: the frozen
    key/value projections) and what its tensors are (``spatial``: the tokens after the
    ``prefix_tokens``, or the feature map, lie on a 2-D image grid; ``convpass`` needs it).
    ``refused`` may also map a missing feature to the reason. ``prefix_tokens`` is how many
    leading tokens (class, register) prompt tokens are inserted after.
    """

    name: str
    kind: str
    dim: int
    placements: frozenset[str]
    out_dim: int | None = None
    layer: int | None = None
    num_heads: int | None = None
    head_dim: int | None = None
    prefix_tokens: int = 0
    features: frozenset[str] = frozenset()
    refused: Mapping[str, str] = field(default_factory=dict, hash=False)
    info: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if self.kind not in SITE_KINDS:
            raise SiteError(f"Site {self.name!r} has unknown kind {self.kind!r}; kinds: {SITE_KINDS}")
        if self.out_dim is None:
            object.__setattr__(self, "out_dim", self.dim)


def _expand_braces(segment: str) -> str:
    """Turn ``{0..3}`` / ``{0,5}`` inside one segment into a regex alternation."""

    def repl(m: re.Match) -> str:
        body = m.group(1)
        if ".." in body:
            lo, _, hi = body.partition("..")
            if not (lo.strip().isdigit() and hi.strip().isdigit()):
                raise SiteError(f"Bad layer range {{{body}}}: write {{first..last}}, e.g. {{0..3}}")
            if int(lo) > int(hi):
                raise SiteError(f"Bad layer range {{{body}}}: first > last; write {{{hi.strip()}..{lo.strip()}}}")
            items = [str(i) for i in range(int(lo), int(hi) + 1)]
        else:
            items = [s.strip() for s in body.split(",")]
        return "(?:" + "|".join(re.escape(s) for s in items) + ")"

    out, pos = [], 0
    for m in re.finditer(r"\{([^{}]*)\}", segment):
        out.append(_glob_part(segment[pos : m.start()]))
        out.append(repl(m))
        pos = m.end()
    out.append(_glob_part(segment[pos:]))
    return "".join(out)


def _glob_part(text: str) -> str:
    return "".join("[^.]*" if c == "*" else "[^.]" if c == "?" else re.escape(c) for c in text)


def pattern_regex(pattern: str) -> re.Pattern:
    # Split on dots outside braces so that ``{0..3}`` stays one segment.
    segments, depth, cur = [], 0, ""
    for c in pattern:
        depth += c == "{"
        depth -= c == "}"
        if c == "." and depth == 0:
            segments.append(cur)
            cur = ""
        else:
            cur += c
    segments.append(cur)
    parts = []
    for seg in segments:
        parts.append(r"(?:[^.]+(?:\.[^.]+)*)" if seg == "**" else _expand_braces(seg))
    return re.compile(r"\.".join(parts) + r"\Z")


def _brace_choices(pattern: str) -> list[str]:
    """The concrete patterns a pattern's first brace group expands to (recursively)."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    body = m.group(1)
    if ".." in body:
        lo, _, hi = body.partition("..")
        items = [str(i) for i in range(int(lo), int(hi) + 1)]
    else:
        items = [i.strip() for i in body.split(",")]
    out: list[str] = []
    for item in items:
        out.extend(_brace_choices(pattern[: m.start()] + item + pattern[m.end() :]))
    return out


def match_sites(patterns: str | Sequence[str], names: Iterable[str], *, owner: str = "backbone") -> list[str]:
    """Site names matched by one or more patterns, in backbone order; each pattern must match."""
    names = list(names)
    if isinstance(patterns, str):
        patterns = [patterns]
    if not patterns:
        raise SiteError("An empty list of site patterns selects nothing; give at least one pattern")
    chosen: set[str] = set()
    for pattern in patterns:
        if not isinstance(pattern, str) or not pattern:
            raise SiteError(f"Site pattern must be a non-empty string, got {pattern!r}")
        rx = pattern_regex(pattern)
        hits = [n for n in names if rx.match(n)]
        if hits:
            # Each choice of a {..} range or {a,b} list must exist: blocks.{0..11} on a 2-block model is a mistake.
            for choice in _brace_choices(pattern):
                if choice != pattern and not any(pattern_regex(choice).match(n) for n in hits):
                    raise SiteError(
                        f"Site pattern {pattern!r} asks for {choice!r}, which matches no site of {owner}. "
                        f"Closest sites: {closest(choice.replace('*', '0'), names, n=5)}"
                    )
        if not hits:
            probe = re.sub(r"\{[^}]*\}", "0", pattern).replace("**", "*").replace("*", "0")
            raise SiteError(
                f"Site pattern {pattern!r} matches no site of {owner}. "
                f"Closest sites: {closest(probe, names, n=5)}"
            )
        chosen.update(hits)
    return [n for n in names if n in chosen]
