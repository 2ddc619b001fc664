"""params.yaml is checked whole at start-up (`config.load_params` -> `schema.validate`): every
key known, typed and in range, the rules across keys, one line naming the key; and no code
default disagrees with the shipped params.yaml."""

from __future__ import annotations

import ast
import copy
from pathlib import Path

import pytest
import yaml

from ttds_core import schema
from ttds_core.cli import run_stage
from ttds_core.config import load_params
from ttds_core.errors import TTDSError

REPO = Path(__file__).resolve().parents[1]
SHIPPED = yaml.safe_load((REPO / "params.yaml").read_text())


def with_value(key: str, value) -> dict:
    params = copy.deepcopy(SHIPPED)
    node = params
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
    return params


def test_the_shipped_params_are_valid_and_the_schema_lists_exactly_their_keys():
    schema.validate(SHIPPED)
    flat = schema.flatten(SHIPPED)
    per_model = {k for k in flat if k.count(".") == 2 and k.startswith("baselines.")}
    assert set(schema.SCHEMA) == set(flat) - per_model


@pytest.mark.parametrize("key, value, fragment", [
    ("train.lrr", 1e-4, "unknown parameter 'train.lrr'"),
    ("optimiser", {"lr": 1}, "unknown parameter 'optimiser.lr'"),
    ("baselines.sasrec.threads", 2, "overrides only"),
    ("baselines.sasrek", {"hidden": 32}, "model sections are"),
    ("index.refresh_every", 100, "'index.refresh_every' is no longer read"),
    ("train.tokenizer_lr", 1e-4, "renamed 'train.quantizer_lr'"),
    ("index.refresh_margin", 1.5, "'index.refresh_margin' = 1.5, expected below 1"),
    ("index.refresh_margin", -0.1, "'index.refresh_margin' = -0.1, expected at least 0"),
    ("index.length", 16, "'index.length' = 16, expected at most 15"),
    ("index.length", True, "'index.length' = True, expected an integer"),
    ("lora.dropout", "high", "'lora.dropout' = 'high', expected a number"),
    ("train.patience", 0, "'train.patience' = 0, expected at least 1"),
    ("eval.scoring", "vocab", "'eval.scoring' = 'vocab', expected one of full, sid"),
    ("eval.ks", [], "'eval.ks' is an empty list"),
    ("eval.ks", [1, "5"], "'eval.ks' entry 1 = '5', expected an integer"),
    ("eval.beams", 5, "'eval.beams' = 5 is smaller than the largest K in eval.ks (10)"),
    ("serve.topk", 50, "'serve.topk' = 50 is larger than 'eval.beams' = 20"),
    ("tasks.weights", {"seqrec": 1.0, "nextuser": 0.2}, "unknown task 'nextuser'"),
    ("tasks.weights", {"seqrec": 0}, "'tasks.weights.seqrec' = 0, expected above 0"),
    ("data.root", None, "'data.root' is null, expected the folder holding the lcrec files"),
    ("baselines.hidden", 63, "'hidden' = 63 is not a multiple of 'heads' = 2"),
    ("baselines.mask_prob", 0, "'mask_prob' = 0, expected above 0"),
    ("tasks.weights", {"seqrec": 1.5}, "'tasks.weights.seqrec' = 1.5, expected above 0 and at most 1"),
    ("train.seed", -1, "'train.seed' = -1, expected at least 0"),
])
def test_bad_params_fail_with_one_line_naming_the_key(key, value, fragment):
    with pytest.raises(TTDSError, match=None) as info:
        schema.validate(with_value(key, value))
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_rules_across_keys():
    ts_align = with_value("tasks.ts_align", True)
    ts_align["index"]["length"] = 1
    with pytest.raises(TTDSError, match="'tasks.ts_align' needs SID prefixes"):
        schema.validate(ts_align)
    generic = with_value("data.format", "generic")
    generic["data"]["root"] = None
    with pytest.raises(TTDSError, match="'data.interactions_file' is null"):
        schema.validate(generic)
    generic["data"]["interactions_file"] = "inter.csv"
    schema.validate(generic)  # a null root is fine for generic
    lsh = with_value("index.kind", "lsh")
    lsh["index"]["codebook_size"] = 200
    with pytest.raises(TTDSError, match="LSH needs a power of two"):
        schema.validate(lsh)
    no_weight = with_value("tasks.ts_align", True)
    del no_weight["tasks"]["weights"]["ts_align"]
    with pytest.raises(TTDSError, match="'tasks.weights.ts_align' is missing"):
        schema.validate(no_weight)
    commented_out = with_value("baselines.gru4rec", None)  # every override commented out
    schema.validate(commented_out)
    no_val = with_value("train.patience", 3)
    no_val["train"]["val_users"] = 0
    with pytest.raises(TTDSError, match="'train.patience' needs validations"):
        schema.validate(no_val)


def test_a_stage_refuses_bad_params_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    Path("params.yaml").write_text(yaml.safe_dump(with_value("index.refresh_margin", 2.0)))
    with pytest.raises(SystemExit) as exit_info:
        run_stage("finetune", "params.yaml")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: params: 'index.refresh_margin' = 2.0, expected below 1"
    assert not Path("data").exists() and not Path("metrics").exists()
    assert load_params(REPO / "params.yaml") == SHIPPED


def _code_defaults():
    """(module, key, default) of every `get(params, "<key>", kind, <default>)` in ttds_core."""
    for path in sorted((REPO / "ttds_core").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "get"
                    and len(node.args) >= 2 and getattr(node.args[0], "id", None) == "params"
                    and isinstance(node.args[1], ast.Constant)):
                continue
            default = node.args[3] if len(node.args) >= 4 else next(
                (kw.value for kw in node.keywords if kw.arg == "default"), None)
            if default is not None:
                yield path.relative_to(REPO).as_posix(), node.args[1].value, ast.literal_eval(default)


def test_no_code_default_disagrees_with_the_shipped_params():
    flat = schema.flatten(SHIPPED)
    wrong = [(module, key, default, flat[key]) for module, key, default in _code_defaults()
             if key in flat and default != flat[key]]
    assert not wrong, f"code defaults that disagree with params.yaml (module, key, code, params.yaml): {wrong}"


def test_every_key_the_code_reads_is_in_the_schema():
    read = set()
    for path in (REPO / "ttds_core").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "get" \
                    and len(node.args) >= 2 and getattr(node.args[0], "id", None) == "params" \
                    and isinstance(node.args[1], ast.Constant):
                read.add(node.args[1].value)
    retired = set(schema.RETIRED)
    unknown = sorted(k for k in read - retired if k not in schema.SCHEMA and k not in schema.SECTIONS)
    assert not unknown, f"keys read by the code but unknown to the schema: {unknown}"


def test_the_schema_names_agree_with_the_modules():
    from ttds_core import (backbone, baselines, data_source, dynamic, prompts, quantize, ranker, tasks, tokens,
                           train_config, user_profile)

    assert schema.FORMATS == data_source.FORMATS and schema.SAMPLERS == data_source.SAMPLERS
    assert schema.INDEX_KINDS == quantize.KINDS and schema.TASKS == tasks.TASKS
    assert schema.SEQREC_FORMATS == prompts.SEQREC_FORMATS and schema.SCORINGS == ranker.SCORINGS
    assert schema.SID_SOFTMAX == train_config.SID_SOFTMAX and schema.USER_PROFILES == user_profile.PROFILES
    assert schema.REFRESH_EMBEDDINGS == dynamic.REFRESH_EMBEDDINGS
    assert schema.DTYPES == ("auto", *backbone.DTYPES)
    assert schema.MAX_INDEX_LENGTH == len(tokens._LETTERS)
    assert schema.BASELINE_MODELS == tuple(baselines.MODELS)
    assert set(schema.PER_MODEL_KEYS) == set(baselines._KEYS) | {"device", "max_minutes"}
