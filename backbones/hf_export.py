"""Merged Hugging Face backbones as folders that ``from_pretrained`` loads (``utuning export``).

``HFFolderExport`` is mixed into the Hugging Face adapters (``hf_text``, ``hf_vision``,
``hf_decoder``): their ``export_native`` writes, with the library's own ``save_pretrained``
on the wrapped model and the merged state dict,

* ``config.json`` and ``model.safetensors`` (``generation_config.json`` for causal LMs; shards
  plus an index above transformers' shard size), which ``AutoModel*.from_pretrained(DIR)`` loads:
  the adapters keep HF's module names, so the merged state dict is the HF model's own;
* the tokenizer files (``tokenizer.json``, ``tokenizer_config.json``...) when the backbone
  carries a tokenizer (built from a hub name or folder, not from a bare model type);
* ``preprocessor_config.json`` copied from the local folder the model was built from, when it
  has one (image processors; the adapters do not load them).

Not in the folder: tuners that cannot be folded (refused before anything is written), head
tuners that are not the model's own head (``utuning.export.fold_heads`` says which), and the
adapter's own options HF's forward does not have (``hf_text`` ``pooling="mean"``: a note says so).
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

PROCESSOR_FILES = ("preprocessor_config.json",)


class HFFolderExport:
    """Mixin of the Hugging Face backbone adapters (before ``Backbone`` in the bases): merged weights
    as a ``from_pretrained`` folder. Reads ``self.model`` (a transformers ``PreTrainedModel``) and
    ``self.tokenizer`` when the adapter has one."""

    native_export = "folder"
    model: Any
    tokenizer: Any

    def export_native(self, out: Path, tensors: Mapping[str, Tensor],
                      metadata: Mapping[str, str] | None = None) -> list[str]:
        """Write the merged ``tensors`` with ``save_pretrained`` into the empty folder ``out``."""
        self.model.save_pretrained(out, state_dict=dict(tensors))
        arch = type(self.model).__name__
        notes = [f"config.json + model.safetensors of a {arch} ({arch}.from_pretrained or its Auto class loads it)"]
        text = hasattr(self, "tokenizer")  # the text adapters carry one (or None); vision ones never
        if text and self.tokenizer is not None:
            self.tokenizer.save_pretrained(out)
            notes.append("the backbone's tokenizer (AutoTokenizer.from_pretrained loads it)")
        elif text:
            notes.append("no tokenizer: the backbone was built without one (from a model type, or tokenizer=False)")
        source = Path(str(getattr(self.model.config, "name_or_path", "") or ""))
        copied = [name for name in PROCESSOR_FILES if source.name and (source / name).is_file()]
        for name in copied:
            shutil.copyfile(source / name, out / name)
        if copied:
            notes.append(f"{copied} from {source}")
        elif not text:
            notes.append("no image processor: the model was not built from a local folder holding "
                         f"{PROCESSOR_FILES[0]}")
        return notes
