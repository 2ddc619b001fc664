"""What a valid params.yaml is: every key, its type and range, and the rules across keys.

`config.load_params` checks the whole file against this before any stage does any work, so a
wrong value fails at start-up with one line naming the key (not at step 100 of training, or
after 200 warm-up epochs), and a misspelt key is an error instead of being silently ignored.

This module only refuses params; it never supplies a value. Stages still read their keys with
`config.get`, whose defaults must equal the shipped `params.yaml` (tested). That is why the
stage-contract test does not count the keys listed here as read by every stage: validating a
key cannot change an output, only stop a run.

Keys missing from the file are not errors here (the stage that reads one names it); the
rules below apply to the keys present.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .errors import TTDSError

# The names the modules that use them define too (tests/test_schema.py checks they agree);
# repeated here so that validating params imports nothing heavy.
FORMATS = ("lcrec", "amazon2018", "generic")
SAMPLERS = ("snowball", "users")
INDEX_KINDS = ("rq", "lsh", "random")
MAX_INDEX_LENGTH = 15            # SID levels with a token namespace (tokens.py: a..o)
TASKS = ("seqrec", "next_user", "preference", "ts_align")
SEQREC_FORMATS = ("prefix", "packed")
SID_SOFTMAX = ("vocab", "sid")
SCORINGS = ("full", "sid", "trie")
USER_PROFILES = ("fresh", "training")
REFRESH_EMBEDDINGS = ("llm", "backbone")
DTYPES = ("auto", "float32", "bfloat16", "float16")
INITS = ("random", "semantic")
BASELINE_MODELS = ("mostpop", "markov", "sasrec", "gru4rec", "bert4rec", "fmlprec")
DEVICES = ("auto", "cpu", "cuda")

# Keys that were renamed: a one-line pointer instead of "unknown parameter".
RETIRED = {
    "index.refresh_every": "replaced by 'index.refresh_samples' (training rows between refreshes, "
                           "so the schedule scales with the batch): 100 steps at batch 8 = 800",
    "train.tokenizer_lr": "renamed 'train.quantizer_lr' (the RQ-VAE side is called the quantizer; "
                          "'tokenizer' is the LLM's text tokenizer)",
}

NUMBER = (int, float)


@dataclass(frozen=True)
class Param:
    kind: type | tuple
    low: float | None = None         # inclusive
    high: float | None = None        # inclusive, unless `below`
    below: bool = False              # high is exclusive
    choices: tuple | None = None
    null: bool = False
    items: type | tuple | None = None  # element type of a list, value type of a mapping


_BASELINE_KEYS = {
    "epochs": Param(int, 1), "batch_size": Param(int, 1), "eval_batch_size": Param(int, 1),
    "lr": Param(NUMBER, 0), "weight_decay": Param(NUMBER, 0), "hidden": Param(int, 1),
    "layers": Param(int, 1), "heads": Param(int, 1), "dropout": Param(NUMBER, 0, 1, below=True),
    "patience": Param(int, 1), "max_minutes": Param(NUMBER, 0, null=True),
    "mask_prob": Param(NUMBER, 0, 1, below=True), "device": Param(str, choices=DEVICES),
    "threads": Param(int, 1, null=True),
}

# what `baselines.<model>.<key>` may override (the rest, e.g. threads, is shared only)
PER_MODEL_KEYS = tuple(k for k in _BASELINE_KEYS if k != "threads")

SCHEMA: dict[str, Param] = {
    "seed": Param(int, 0),
    "data.format": Param(str, choices=FORMATS),
    "data.root": Param(str, null=True),
    "data.name": Param(str),
    "data.item_text_file": Param(str, null=True),
    "data.interactions_file": Param(str, null=True),
    "data.items_file": Param(str, null=True),
    "data.require_text": Param(bool),
    "data.kcore": Param(int, 1),
    "data.max_users": Param(int, 1, null=True),
    "data.sampler": Param(str, choices=SAMPLERS),
    "data.max_history": Param(int, 1),
    "data.user_text_items": Param(int, 1),
    "data.item_text_chars": Param(int, 16),
    "data.user_text_chars": Param(int, 16),
    "data.review_chars": Param(int, 16),
    "model.path": Param(str),
    "model.dtype": Param(str, choices=DTYPES),
    "model.num_layers": Param(int, 1, null=True),
    "model.max_text_tokens": Param(int, 1),
    "embed.batch_size": Param(int, 1),
    "index.kind": Param(str, choices=INDEX_KINDS),
    "index.length": Param(int, 1, MAX_INDEX_LENGTH),
    "index.codebook_size": Param(int, 2),
    "index.code_dim": Param(int, 1),
    "index.max_suffix": Param(int, 1),
    "index.dynamic": Param(bool),
    "index.refresh_samples": Param(int, 1),
    "index.refresh_margin": Param(NUMBER, 0, 1, below=True),
    "index.refresh_embeddings": Param(str, choices=REFRESH_EMBEDDINGS),
    "index.tie_embeddings": Param(bool),
    "index.cf_mix": Param(NUMBER, 0, 1),
    "warmup.epochs": Param(int, 0),
    "warmup.batch_size": Param(int, 1),
    "warmup.lr": Param(NUMBER, 0),
    "warmup.beta": Param(NUMBER, 0),
    "warmup.kmeans_sample": Param(int, 1),
    "warmup.kmeans_iters": Param(int, 1),
    "warmup.dead_code_every": Param(int, 0),
    "warmup.eval_every": Param(int, 1),
    "tower.user": Param(bool),
    "tasks.high_order": Param(bool),
    "tasks.weights": Param(dict, items=NUMBER),
    "tasks.ts_align": Param(bool),
    "tasks.ts_align_words": Param(int, 1),
    "tasks.max_next_user": Param(int, 1),
    "tasks.max_response_tokens": Param(int, 1),
    "tasks.seqrec_format": Param(str, choices=SEQREC_FORMATS),
    "loss.dm_vae": Param(bool),
    "loss.alpha": Param(NUMBER, 0),
    "loss.beta": Param(NUMBER, 0),
    "loss.sid_softmax": Param(str, choices=SID_SOFTMAX),
    "init.sid_embeddings": Param(str, choices=INITS),
    "lora.r": Param(int, 1),
    "lora.alpha": Param(int, 1),
    "lora.dropout": Param(NUMBER, 0, 1, below=True),
    "lora.fp32_adapters": Param(bool),
    "lora.targets": Param(list, items=str),
    "train.epochs": Param(int, 1),
    "train.max_steps": Param(int, 1, null=True),
    "train.batch_size": Param(int, 1),
    "train.grad_accum": Param(int, 1),
    "train.lr": Param(NUMBER, 0),
    "train.embedding_lr": Param(NUMBER, 0),
    "train.warmup_ratio": Param(NUMBER, 0, 1),
    "train.weight_decay": Param(NUMBER, 0),
    "train.quantizer_lr": Param(NUMBER, 0),
    "train.max_grad_norm": Param(NUMBER, 0),
    "train.dmvae_batch": Param(int, 1),
    "train.bucket_batches": Param(int, 1),
    "train.packing": Param(bool),
    "train.fused_optimizer": Param(bool),
    "train.log_every": Param(int, 1),
    "train.checkpoint_every": Param(int, 1),
    "train.patience": Param(int, 1, null=True),
    "train.user_token_dropout": Param(NUMBER, 0, 1, below=True),
    "train.max_minutes": Param(NUMBER, 0, null=True),
    "train.threads": Param(int, 1, null=True),
    "train.val_users": Param(int, 0),
    "train.template": Param(int, 0),
    "train.seed": Param(int, 0, null=True),
    "eval.beams": Param(int, 1),
    "eval.batch_size": Param(int, 1),
    "eval.mask_history": Param(bool),
    "eval.max_users": Param(int, 1, null=True),
    "eval.scoring": Param(str, choices=SCORINGS),
    "eval.ks": Param(list, items=int),
    "eval.popularity_prior": Param(NUMBER, 0),
    "eval.copy_penalty": Param(NUMBER, 0),
    "eval.user_profile": Param(str, choices=USER_PROFILES),
    "serve.topk": Param(int, 1),
    "serve.mask_history": Param(bool),
    "serve.max_users": Param(int, 1, null=True),
    "serve.user_profile": Param(str, choices=USER_PROFILES),
    **{f"baselines.{key}": spec for key, spec in _BASELINE_KEYS.items()},
}
SECTIONS = {key.rpartition(".")[0] for key in SCHEMA if "." in key}


def type_name(kind) -> str:
    """How an error line names the expected type ("an integer", "a number", ...)."""
    if isinstance(kind, tuple):
        return "a number" if kind == NUMBER else " or ".join(type_name(k) for k in kind)
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false",
            list: "a list", dict: "a mapping", type(None): "null"}.get(kind, kind.__name__)


def is_kind(value, kind) -> bool:
    """isinstance, except that true/false is not a number and '5e-4' (YAML reads it as a
    string) is one. The one type rule of the schema and of `config.get`."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool):
        return bool in kinds
    if isinstance(value, str) and float in kinds:
        try:
            float(value)
            return True
        except ValueError:
            return False
    return isinstance(value, kinds)


def check_value(key: str, value, spec: Param) -> None:
    """One line naming `key` when `value` does not fit `spec`."""
    if value is None:
        if spec.null:
            return
        raise TTDSError(f"params: '{key}' is null, expected {type_name(spec.kind)}")
    if not is_kind(value, spec.kind):
        raise TTDSError(f"params: '{key}' = {value!r}, expected {type_name(spec.kind)}"
                        + (" or null" if spec.null else ""))
    if spec.choices is not None and value not in spec.choices:
        raise TTDSError(f"params: '{key}' = {value!r}, expected one of {', '.join(map(str, spec.choices))}")
    if spec.items is not None:
        entries = value.items() if isinstance(value, dict) else enumerate(value)
        for name, item in entries:
            if not is_kind(item, spec.items):
                raise TTDSError(f"params: '{key}' entry {name!r} = {item!r}, expected {type_name(spec.items)}")
        if isinstance(value, list) and not value:
            raise TTDSError(f"params: '{key}' is an empty list")
    if spec.low is not None or spec.high is not None:
        number = float(value)
        if spec.low is not None and number < spec.low:
            raise TTDSError(f"params: '{key}' = {value!r}, expected at least {spec.low:g}")
        if spec.high is not None and (number >= spec.high if spec.below else number > spec.high):
            raise TTDSError(f"params: '{key}' = {value!r}, expected "
                            f"{'below' if spec.below else 'at most'} {spec.high:g}")


def flatten(params: dict, prefix: str = "") -> dict:
    """`{"a": {"b": 1}}` -> `{"a.b": 1}`, except the mappings the schema takes whole."""
    out = {}
    for name, value in params.items():
        key = f"{prefix}{name}"
        if isinstance(value, dict) and key not in SCHEMA:
            out.update(flatten(value, key + "."))
            if not value:
                out[key] = value
        else:
            out[key] = value
    return out


def spec_of(key: str) -> Param | None:
    """The schema entry of `key`; per-model baseline overrides take the shared key's entry."""
    if key in SCHEMA:
        return SCHEMA[key]
    parts = key.split(".")
    if len(parts) == 3 and parts[0] == "baselines" and parts[1] in BASELINE_MODELS \
            and parts[2] in PER_MODEL_KEYS:
        return _BASELINE_KEYS[parts[2]]
    return None


# --------------------------------------------------------------------------- rules across keys

def _beams_cover_ks(flat):
    beams, ks = flat.get("eval.beams"), flat.get("eval.ks")
    if isinstance(beams, int) and ks and all(is_kind(k, int) for k in ks) and beams < max(ks):
        return f"'eval.beams' = {beams} is smaller than the largest K in eval.ks ({max(ks)})"


def _ks_positive(flat):
    ks = flat.get("eval.ks")
    if ks and any(k < 1 for k in ks):
        return f"'eval.ks' = {ks}, expected positive cut-offs"


def _topk_within_beams(flat):
    topk, beams = flat.get("serve.topk"), flat.get("eval.beams")
    if isinstance(topk, int) and isinstance(beams, int) and topk > beams:
        return f"'serve.topk' = {topk} is larger than 'eval.beams' = {beams} (the cache holds the beams)"


def _data_source(flat):
    fmt = flat.get("data.format")
    if fmt == "generic" and "data.interactions_file" in flat and not flat["data.interactions_file"]:
        return "'data.interactions_file' is null, expected the interactions table (data.format generic)"
    if fmt in ("lcrec", "amazon2018") and "data.root" in flat and not flat["data.root"]:
        return f"'data.root' is null, expected the folder holding the {fmt} files"


def _task_weights(flat):
    weights = flat.get("tasks.weights")
    if not isinstance(weights, dict):
        return None
    for task, weight in weights.items():
        if task not in TASKS:
            return f"'tasks.weights' has unknown task {task!r}, expected some of {', '.join(TASKS)}"
        if is_kind(weight, NUMBER) and float(weight) < 0:
            return f"'tasks.weights.{task}' = {weight!r}, expected at least 0"
    seqrec = weights.get("seqrec", 1.0)
    if is_kind(seqrec, NUMBER) and not 0 < float(seqrec) <= 1:
        return (f"'tasks.weights.seqrec' = {seqrec!r}, expected above 0 and at most 1 (the share of the "
                "seqrec rows kept; next-item generation is the task every model is ranked on)")
    if flat.get("tasks.ts_align") is True and "ts_align" not in weights:
        return "'tasks.ts_align' is on but 'tasks.weights.ts_align' is missing"


def _ts_align_needs_prefixes(flat):
    if flat.get("tasks.ts_align") is True and isinstance(flat.get("index.length"), int) \
            and flat["index.length"] < 2:
        return "'tasks.ts_align' needs SID prefixes, i.e. 'index.length' >= 2"


def _user_dropout_needs_user_tower(flat):
    rate = flat.get("train.user_token_dropout")
    if is_kind(rate, NUMBER) and float(rate) > 0 and flat.get("tower.user") is False:
        return "'train.user_token_dropout' drops the user SID from prompts, but 'tower.user' is false (there is none)"


def _patience_needs_validation(flat):
    if isinstance(flat.get("train.patience"), int) and flat.get("train.val_users") == 0:
        return "'train.patience' needs validations: 'train.val_users' is 0"


def _baseline_settings(flat):
    """Per model, as `baselines.model_config` resolves them (a model's override, else shared)."""
    for model in BASELINE_MODELS:
        hidden = flat.get(f"baselines.{model}.hidden", flat.get("baselines.hidden"))
        heads = flat.get(f"baselines.{model}.heads", flat.get("baselines.heads"))
        if isinstance(hidden, int) and isinstance(heads, int) and heads > 0 and hidden % heads:
            return (f"baselines ({model}): 'hidden' = {hidden} is not a multiple of 'heads' = {heads} "
                    "(attention splits the hidden size over the heads)")
        mask_prob = flat.get(f"baselines.{model}.mask_prob", flat.get("baselines.mask_prob"))
        if is_kind(mask_prob, NUMBER) and not float(mask_prob) > 0:
            return f"baselines ({model}): 'mask_prob' = {mask_prob!r}, expected above 0"


def _lsh_codebook(flat):
    size = flat.get("index.codebook_size")
    if flat.get("index.kind") == "lsh" and isinstance(size, int) and size >= 2 and size & (size - 1):
        return f"'index.codebook_size' = {size}, LSH needs a power of two (log2 N sign bits per level)"


RULES: tuple[Callable[[dict], str | None], ...] = (
    _beams_cover_ks, _ks_positive, _topk_within_beams, _data_source, _task_weights,
    _ts_align_needs_prefixes, _patience_needs_validation, _user_dropout_needs_user_tower, _baseline_settings, _lsh_codebook)


def validate(params: dict) -> None:
    """Check every key present (known, typed, in range) and every rule across keys; raise a
    one-line `TTDSError` naming the first key that is wrong."""
    flat = flatten(params)
    for key, value in flat.items():
        if key in RETIRED:
            raise TTDSError(f"params: '{key}' is no longer read: {RETIRED[key]}")
        spec = spec_of(key)
        if spec is None:
            model_section = key.startswith("baselines.") and key.split(".")[1] in BASELINE_MODELS
            if (value is None or value == {}) and (key in SECTIONS or model_section):
                continue  # an empty section (a `gru4rec:` whose overrides are all commented out)
            section = key.rpartition(".")[0]
            if section.startswith("baselines.") and section.split(".")[1] in BASELINE_MODELS:
                hint = f"a model section overrides only {', '.join(PER_MODEL_KEYS)}"
            elif section.startswith("baselines."):
                hint = f"model sections are {', '.join(BASELINE_MODELS)}"
            else:
                hint = "see params.yaml for the keys"
            raise TTDSError(f"params: unknown parameter '{key}' ({hint})")
        check_value(key, value, spec)
    for rule in RULES:
        problem = rule(flat)
        if problem:
            raise TTDSError(f"params: {problem}")
