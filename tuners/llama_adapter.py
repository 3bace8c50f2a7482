"""LLaMA-Adapter's adaption prompt: attention over learned prompts, gated from zero."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from utuning.attention import merge_heads
from utuning.errors import ConfigError, PlacementError, closest
from utuning.handle import OpHandle
from utuning.registry import register_tuner
from utuning.sites import SiteSpec
from utuning.tuner import Tuner
from utuning.tuners._common import positive

GATES = ("head", "layer")


@register_tuner("adaption_prompt")
class AdaptionPrompt(Tuner):
    """LLaMA-Adapter's zero-initialised attention (Zhang et al. 2023, arXiv 2303.16199, Eq. 6-8):
    learned prompt tokens ``P`` (K, D) enter attention through the frozen key/value projections,
    their softmax is taken apart from the sequence's, scaled by a gate ``g`` that starts at zero,
    and summed with the ordinary attention *before* the frozen output projection ``W_o``::

        OP'(x) = W_o (a + u) + b = OP(x) + W_o u,   u = merge_h( g_h · softmax(Q_h (P W_k)_h^T / √Dh) (P W_v)_h )

    ``Q`` is the block's own query (rotated at the tokens' positions in rotary models; the prompt
    keys are not rotated). Placement ``parallel`` on attention sites (``blocks.{i}.attn``; the paper
    adapts the top layers, e.g. ``blocks.{8..11}`` of 12). Arguments (defaults: the paper and its
    code, github.com/OpenGVLab/LLaMA-Adapter ``alpaca_finetuning_v1/llama/model.py``):

    * ``tokens=10``: prompts per layer, ~ N(0, 1) (the paper's ``nn.Embedding``).
    * ``gate="head"``: one gate per head (1, H, 1, 1), as the paper's code; ``"layer"``: one per
      layer, as HF PEFT's ``AdaptionPromptConfig``.
    * ``project=True``: ``W_o u`` (needs the handle entry ``out_proj``); ``False`` adds ``u`` after
      the operation without ``W_o``, as PEFT does on GPT-2.
    * ``prompt_norm=False``: the prompts enter the key/value projections directly, as in the paper's
      code and PEFT (needs ``raw_key_value``); ``True`` passes them through the site's pre-norm
      like the sequence's tokens.
    * ``rotate_query=True``: the query the attention uses, rotated where the site offers
      ``rotary_query`` (decoders); ``False``: ``handle.query`` (un-rotated on decoders).

    The paper's code also squashes the gate with ``tanh`` (not in the paper's equations; not done
    here: at the zero start both have slope 1). HF PEFT's form is ``gate="layer"`` with the other
    defaults (tested equal to PEFT on Llama with grouped-query attention).
    """

    placement = "parallel"
    site_kinds = frozenset({"attn"})
    requires = frozenset({"query", "key_value"})
    paper = "https://arxiv.org/abs/2303.16199"

    def __init__(self, site: SiteSpec, *, tokens: int = 10, gate: str = "head", project: bool = True,
                 prompt_norm: bool = False, rotate_query: bool = True) -> None:
        super().__init__(site)
        positive("tokens", tokens)
        if gate not in GATES:
            raise ConfigError(f"adaption_prompt gate={gate!r} is not one of {list(GATES)}; "
                              f"did you mean {closest(str(gate), GATES)}?")
        needs = {"out_proj": ("project=True", "project=False adds the prompt attention after the operation, "
                              "without W_o")} if project else {}
        if not prompt_norm:
            needs["raw_key_value"] = ("prompt_norm=False", "prompt_norm=True passes the prompts through the "
                                      "site's pre-norm")
        for entry, (arg, instead) in needs.items():
            if entry not in site.features:
                raise PlacementError(f"Tuner 'adaption_prompt' with {arg} needs the handle entry {entry!r}, which "
                                     f"site {site.name!r} does not offer (it offers {sorted(site.features)}); "
                                     f"{instead}")
        self.project, self.prompt_norm = bool(project), bool(prompt_norm)
        self.rotate_query = bool(rotate_query) and "rotary_query" in site.features
        self.prompts = nn.Parameter(torch.randn(1, tokens, site.dim))  # (1, K, D)
        self.gate = nn.Parameter(torch.zeros(1, site.num_heads if gate == "head" else 1, 1, 1))  # (1, H or 1, 1, 1)

    def forward(self, x: Tensor, op: OpHandle) -> Tensor:  # (B, N, D) -> (B, N, D_out)
        q = op.rotary_query(x) if self.rotate_query else op.query(x)  # (B, H, N, Dh)
        prompts = self.prompts.expand(q.shape[0], -1, -1)  # (B, K, D)
        k, v = op.key_value(prompts) if self.prompt_norm else op.raw_key_value(prompts)  # (B, H, K, Dh) x2
        u = merge_heads(self.gate.to(q.dtype) * F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype)))
        return op.out_proj(u) if self.project else u  # (B, N, D)
