"""The finetune stage end to end on a toy project with a tiny random LLaMA: memorisation,
static vs dynamic index, the saved recommender, resume after a kill, two-process DDP."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import save_file

from ttds_core import finetune
from ttds_core import model as ttds_model
from ttds_core.io import load_tensors, read_parquet
from ttds_core.prompts import seqrec_prompt
from ttds_core.recommender import load_recommender
from ttds_core.vocab import encode_prompt, encode_response

from test_finetune_helpers import REPO, build_toy_project, toy_params

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    build_toy_project(root)
    return root


@pytest.fixture
def project(toy_root, tmp_path, monkeypatch):
    """A fresh copy of the toy project as the working directory."""
    shutil.copytree(toy_root / "data", tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _teacher_forced_accuracy(rec, pairs, sid_only: bool = False) -> float:
    """Share of pairs whose whole response is the arg-max at every position (over the SID
    tokens + EOS only with `sid_only`, the candidates `loss.sid_softmax: sid` scores)."""
    model, tok = rec.model, rec.tokenizer
    first, n_rows = rec.meta["first_id"], rec.meta["n_rows"]
    cols = torch.tensor(list(range(first, first + n_rows)) + [tok.eos_token_id])
    hits = 0
    with torch.no_grad():
        for prompt, target in pairs:
            p, r = encode_prompt(tok, prompt), encode_response(tok, target)
            ids = torch.tensor([p + r])
            logits = model(input_ids=ids).logits[0, len(p) - 1:-1]
            pred = cols[logits[:, cols].argmax(-1)] if sid_only else logits.argmax(-1)
            hits += int(pred.tolist() == r)
    return hits / len(pairs)


@pytest.mark.parametrize("softmax,packing", [("vocab", False), ("sid", False), ("sid", True)])
def test_memorises_next_item_sids_static_index(project, softmax, packing):
    # The whole toy set (16 seqrec samples) per step; a frozen *random* backbone learns
    # only through LoRA and the SID rows, so it needs a few hundred steps.
    params = toy_params(**{"train.packing": packing, "index.dynamic": False, "tasks.high_order": False, "loss.dm_vae": False,
                           "train.epochs": 400, "train.max_steps": 250, "train.batch_size": 16,
                           "train.lr": 1.0e-2, "train.embedding_lr": 3.0e-2, "train.max_grad_norm": 0.0,
                           "lora.r": 8, "lora.alpha": 16, "train.val_users": 0, "train.checkpoint_every": 1000,
                           "loss.sid_softmax": softmax, "tasks.seqrec_format": "prefix"})
    out = finetune.run(params)
    hist = out["history"]
    start, end = np.mean([h["loss_llm"] for h in hist[:3]]), np.mean([h["loss_llm"] for h in hist[-3:]])
    assert end < 0.02 * start and end < 0.3, (start, end)
    assert out["churn"] == []  # static index: never refreshed
    # the SID tables are exactly the build_sids ones
    pd.testing.assert_frame_equal(read_parquet("data/model/item_sids.parquet"), read_parquet("data/sids/items.parquet"))
    pd.testing.assert_frame_equal(read_parquet("data/model/user_sids.parquet"), read_parquet("data/sids/users.parquet"))
    # the saved recommender reproduces the training-time model and has memorised the targets
    rec = load_recommender(params, device="cpu")
    items, users = rec.item_sids.sort_values("item_id")["sid"].tolist(), rec.user_sids.sort_values("user_id")["sid"].tolist()
    seqs = read_parquet("data/processed/sequences.parquet")
    pairs = []
    for u, seq in zip(seqs["user_id"], seqs["items"]):
        train = list(seq[:-2])
        for p in range(1, len(train)):
            hist_sids = [items[i] for i in train[max(0, p - 4):p]]
            pairs.append((seqrec_prompt(hist_sids, users[u], 0), items[train[p]]))
    assert _teacher_forced_accuracy(rec, pairs, sid_only=softmax == "sid") >= 0.75  # whole SID + EOS, chance ~1/12
    metrics = json.loads(Path("metrics/finetune.json").read_text())
    assert metrics["steps"] == 250 and metrics["tokens_per_second"] > 0 and metrics["peak_rss_mb"] > 0


@pytest.mark.parametrize("softmax,scoring,fmt", [("vocab", "full", "prefix"), ("sid", "sid", "prefix"),
                                                ("sid", "sid", "packed")])
def test_saved_recommender_reproduces_the_training_model(project, softmax, scoring, fmt):
    """The validation measured inside training (SID rows in wrappers, LoRA unmerged) equals
    what `load_recommender`'s plain merged model gives on the same users: the teacher-
    forced loss, and HR@10 / NDCG@10 of the constrained beam search."""
    from ttds_core.cases import target_ranks
    from ttds_core.ranker import Case, PromptBuilder, rank_cases, ranker_for
    from ttds_core.metrics import metric_table
    from ttds_core.tasks import validation_samples

    params = _dynamic_params(**{"train.val_users": 8, "loss.sid_softmax": softmax, "eval.scoring": scoring,
                                "tasks.seqrec_format": fmt})
    packed = fmt == "packed"
    finetune.run(params)
    best = json.loads(Path("metrics/finetune.json").read_text())["best"]
    rec = load_recommender(params, device="cpu")
    items, users = rec.item_sids.sort_values("item_id")["sid"].tolist(), rec.user_sids.sort_values("user_id")["sid"].tolist()
    seqs = read_parquet("data/processed/sequences.parquet")
    val = validation_samples(seqs, params["train"]["val_users"], params["seed"])
    first, n_rows = rec.meta["first_id"], rec.meta["n_rows"]
    cols = list(range(first, first + n_rows)) + [rec.tokenizer.eos_token_id]
    total, n = 0.0, 0
    with torch.no_grad():
        for u, history, target in val:
            prompt = seqrec_prompt([items[i] for i in history[-4:]], users[u], 0, packed, rec.tokenizer.eos_token)
            p, r = encode_prompt(rec.tokenizer, prompt), encode_response(rec.tokenizer, items[target])
            logits = rec.model(input_ids=torch.tensor([p + r])).logits[0, len(p) - 1:-1]
            target_ids = torch.tensor(r)
            if softmax == "sid":
                logits, target_ids = logits[:, cols], torch.tensor([cols.index(t) for t in r])
            total += float(torch.nn.functional.cross_entropy(logits, target_ids, reduction="sum"))
            n += len(r)
    assert abs(total / n - best["val_loss"]) < 1e-3
    ranker, _ = ranker_for(rec.model, rec.tokenizer, rec.item_sids, params["eval"]["beams"], scoring)
    builder = PromptBuilder(rec.tokenizer, rec.item_sids, rec.user_sids, 0, packed)
    cases = [Case(u, "valid", h[-4:], h, t) for u, h, t in val]
    ranks = target_ranks(cases, rank_cases(ranker, builder, cases, 4, modes=(False,)))[False]
    expected = metric_table(ranks, [10])
    assert best["val_HR@10"] == pytest.approx(expected["HR@10"]) and best["val_NDCG@10"] == pytest.approx(expected["NDCG@10"])


def _outputs() -> dict:
    rows = load_tensors("data/model/sid_rows.safetensors")
    adapter = load_tensors("data/model/adapter/adapter_model.safetensors")
    return {"rows": rows["input"], **adapter, "items": read_parquet("data/model/item_sids.parquet")["sid"].tolist(),
            "tok": load_tensors("data/model/quantizers.safetensors")}


def _dynamic_params(**kw):
    return toy_params(**{"lora.dropout": 0.1, "train.epochs": 3, "train.max_steps": 8, "train.checkpoint_every": 4,
                         "index.refresh_samples": 16, **kw})


LEAN = {"train.fused_optimizer": True, "train.log_every": 3, "train.packing": True}


@pytest.mark.parametrize("lean", [False, True])
def test_resume_after_a_kill_equals_an_uninterrupted_run(toy_root, tmp_path, monkeypatch, lean):
    runs = {}
    for name in ("straight", "killed"):
        shutil.copytree(toy_root / "data", tmp_path / name / "data")
        monkeypatch.chdir(tmp_path / name)
        params = _dynamic_params(**(LEAN if lean else {}))
        if name == "killed":
            real_save = finetune.save_checkpoint

            def save_then_die(*args, **kwargs):
                real_save(*args, **kwargs)
                raise KeyboardInterrupt("killed after the first checkpoint")

            monkeypatch.setattr(finetune, "save_checkpoint", save_then_die)
            with pytest.raises(KeyboardInterrupt):
                finetune.run(params)
            monkeypatch.setattr(finetune, "save_checkpoint", real_save)
            assert json.loads(Path("data/checkpoints/last/state.json").read_text())["step"] == 4
        runs[name] = (finetune.run(params), _outputs())
        assert not Path("data/checkpoints/last").exists()  # finished runs leave nothing to resume
    (a, out_a), (b, out_b) = runs["straight"], runs["killed"]
    assert [h["step"] for h in b["history"]] == list(range(1, 9))
    for ha, hb in zip(a["history"], b["history"]):
        for k in ("loss_llm", "loss_id", "loss_token", "lr"):
            assert ha[k] == pytest.approx(hb[k], rel=1e-5, abs=1e-6)
    assert a["churn"] == b["churn"] and len(a["churn"]) == 1  # one refresh at step 4
    assert out_a["items"] == out_b["items"]
    for key in out_a:
        if key not in ("items", "tok"):
            torch.testing.assert_close(out_a[key], out_b[key], rtol=1e-5, atol=1e-6)
    for key in out_a["tok"]:
        torch.testing.assert_close(out_a["tok"][key], out_b["tok"][key], rtol=1e-5, atol=1e-6)
    metrics = json.loads(Path("metrics/finetune.json").read_text())
    assert metrics["resumed_from_step"] == 4


def _kill_at_first_checkpoint(monkeypatch, params, when=lambda progress: True):
    """Run finetune until the first checkpoint for which `when(progress)` holds, then die."""
    real_save = finetune.save_checkpoint

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)
        if when(args[5]):
            raise KeyboardInterrupt("killed after a checkpoint")

    monkeypatch.setattr(finetune, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        finetune.run(params)
    monkeypatch.setattr(finetune, "save_checkpoint", real_save)


def test_checkpoint_of_other_params_is_not_resumed(project, capsys, monkeypatch):
    _kill_at_first_checkpoint(monkeypatch, _dynamic_params())
    out = finetune.run(_dynamic_params(**{"loss.alpha": 0.5}))
    err = capsys.readouterr().err
    assert "was made from other params; set aside as data/checkpoints/last.stale, starting fresh" in err
    assert [h["step"] for h in out["history"]] == list(range(1, 9))
    assert Path("data/checkpoints/last.stale/state.json").exists()  # kept, not deleted
    _kill_at_first_checkpoint(monkeypatch, _dynamic_params())  # a second stale one replaces the first
    finetune.run(_dynamic_params(**{"loss.alpha": 0.7}))
    assert "set aside as data/checkpoints/last.stale (replacing an older one)" in capsys.readouterr().err


@pytest.mark.parametrize("changed", ["data/embeddings", "data/sids", "data/processed"])
def test_checkpoint_of_other_inputs_is_not_resumed(project, capsys, monkeypatch, changed):
    """Upstream outputs changed after a kill (new embeddings, new SIDs after a warmup change,
    other data): the checkpoint was trained on other inputs and must not be resumed."""
    _kill_at_first_checkpoint(monkeypatch, _dynamic_params())
    if changed == "data/embeddings":
        x = np.load("data/embeddings/items.npy")
        np.save("data/embeddings/items.npy", x + 1e-3)
    elif changed == "data/sids":
        table = read_parquet("data/sids/items.parquet")
        table.iloc[::-1].to_parquet("data/sids/items.parquet", index=False)  # same SIDs, other file
    else:
        seqs = read_parquet("data/processed/sequences.parquet")
        seqs.iloc[::-1].to_parquet("data/processed/sequences.parquet", index=False)
    out = finetune.run(_dynamic_params())
    assert f"was made from other {changed}; set aside" in capsys.readouterr().err
    assert [h["step"] for h in out["history"]] == list(range(1, 9))
    assert json.loads(Path("metrics/finetune.json").read_text())["resumed_from_step"] is None


def test_resume_after_a_best_that_is_never_beaten_saves_that_best(toy_root, tmp_path, monkeypatch):
    """Killed after the validation whose score is never beaten later: the resumed run must
    save the model of that best step, byte for byte what an uninterrupted run saves."""
    params = _dynamic_params(**{"train.max_steps": None, "train.epochs": 3, "train.checkpoint_every": 1})
    saved = {}
    for name in ("straight", "killed"):
        shutil.copytree(toy_root / "data", tmp_path / name / "data")
        monkeypatch.chdir(tmp_path / name)
        calls = []

        def falling_validation(*args, **kwargs):  # every later epoch scores worse
            calls.append(1)
            score = 1.0 / len(calls)
            return {"val_HR@10": score, "val_NDCG@10": score, "val_loss": 1.0, "val_sid_acc": 0.0, "val_users": 4}

        monkeypatch.setattr(finetune, "validate", falling_validation)
        if name == "killed":
            _kill_at_first_checkpoint(monkeypatch, params, when=lambda progress: progress.best is not None)
            state = json.loads(Path("data/checkpoints/last/state.json").read_text())
            assert state["best"]["step"] < state["step"]
        out = finetune.run(params)
        assert len(out["history"]) > out["best"]["step"]          # the best is not the last step
        saved[name] = {p.relative_to("data/model"): p.read_bytes()
                       for p in sorted(Path("data/model").rglob("*")) if p.is_file()}
        saved[name]["validation curve"] = json.dumps(json.loads(Path("metrics/finetune.json").read_text())["validation"])
        best_step = out["best"]["step"]
    assert json.loads(Path("metrics/finetune.json").read_text())["resumed_from_step"] is not None
    assert saved["straight"].keys() == saved["killed"].keys()
    for path in saved["straight"]:
        assert saved["straight"][path] == saved["killed"][path], f"{path} differs (best step {best_step})"


def test_patience_stops_early_and_saves_the_best_state(project, monkeypatch):
    """`train.patience`: stop after that many epoch-end validations without a better score,
    as the baselines do; the model saved is the best one, the curve is in the metrics."""
    scores = iter([0.3, 0.5, 0.4, 0.2, 0.9, 0.9])  # best at the 2nd validation, then two worse ones

    def validation(*args, **kwargs):
        s = next(scores)
        return {"val_HR@10": s, "val_NDCG@10": s, "val_loss": 1.0, "val_sid_acc": 0.0, "val_users": 4}

    monkeypatch.setattr(finetune, "validate", validation)
    out = finetune.run(_dynamic_params(**{"train.max_steps": None, "train.epochs": 6, "train.patience": 2}))
    metrics = json.loads(Path("metrics/finetune.json").read_text())
    assert metrics["stopped_early"] is True
    assert [v["val_NDCG@10"] for v in metrics["validation"]] == [0.3, 0.5, 0.4, 0.2]
    assert metrics["best"]["step"] == metrics["validation"][1]["step"] < out["history"][-1]["step"]
    assert metrics["steps"] == metrics["validation"][3]["step"] < metrics["planned_steps"]
    with pytest.raises(finetune.TTDSError, match="train.patience"):
        finetune.run(_dynamic_params(**{"train.patience": 0}))
    with pytest.raises(finetune.TTDSError, match="train.val_users"):
        finetune.run(_dynamic_params(**{"train.patience": 2, "train.val_users": 0}))


@pytest.mark.parametrize("packing", [False, True])
def test_dynamic_index_tokenizer_trains_and_sids_are_refreshed(project, packing):
    before = load_tensors("data/quantizer/item.safetensors")
    out = finetune.run(_dynamic_params(**{"lora.dropout": 0.0, "train.packing": packing}))
    after = {k[len("item."):]: v for k, v in load_tensors("data/model/quantizers.safetensors").items()
             if k.startswith("item.")}
    assert not torch.equal(before["codebooks"], after["codebooks"])  # the RQ-VAE kept training
    assert [c["step"] for c in out["churn"]] == [4] and {"churn_item", "churn_user"} <= set(out["churn"][0])


def test_a_refresh_from_the_backbone_vectors_re_embeds_nothing(project, monkeypatch):
    from ttds_core import embedding

    def no_embedding(*args, **kwargs):
        raise AssertionError("index.refresh_embeddings: backbone must not re-embed the texts")

    monkeypatch.setattr(embedding, "embed_texts", no_embedding)
    out = finetune.run(_dynamic_params(**{"index.refresh_embeddings": "backbone", "index.refresh_margin": 0.0}))
    assert [c["step"] for c in out["churn"]] == [4] and {"churn_item", "churn_user"} <= set(out["churn"][0])
    with pytest.raises(AssertionError, match="must not re-embed"):  # the paper's refresh does re-embed
        finetune.run(_dynamic_params())


def test_ts_align_task_trains_when_switched_on(project):
    finetune.run(_dynamic_params(**{"tasks.ts_align": True, "tasks.weights.ts_align": 0.5, "train.val_users": 2}))
    summary = json.loads(Path("metrics/finetune.json").read_text())
    # trained through a refresh of the index (step 4 of 8): the prefixes it describes moved with it
    assert summary["task_counts"]["ts_align"] > 0 and summary["steps"] == 8
    assert [c["step"] for c in summary["churn"]] == [4]


@pytest.mark.parametrize("packing", [False, True])
def test_ddp_two_processes(project, packing):
    params = _dynamic_params(**{"train.max_steps": 3, "train.batch_size": 2, "train.checkpoint_every": 2,
                                "index.refresh_samples": 8,  # 2 steps of 2 rows x 2 processes
                                "train.packing": packing})
    Path("params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    # The multi-GPU launch line of the README. Without CUDA, `--multi_gpu` still starts the
    # processes through torchrun and Accelerator(cpu=True) runs gloo DDP across them
    # (`--cpu` alone would start one process unless MPI is set up).
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           str(REPO / "stages" / "finetune.py")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads(Path("metrics/finetune.json").read_text())
    assert metrics["processes"] == 2 and metrics["steps"] == 3
    assert Path("data/model/adapter/adapter_model.safetensors").exists()
    assert [c["step"] for c in metrics["churn"]] == [2]


@pytest.mark.parametrize("fused", [False, True])
def test_non_finite_gradient_skips_the_update_and_is_logged(project, monkeypatch, capsys, fused):
    """One NaN loss (hence NaN gradients) must not reach the weights through the clipping:
    the update is skipped, listed in metrics, and training goes on with finite weights.
    Fused: the skip is decided on the device and reported when the losses are read back."""
    real = ttds_model.response_loss
    calls = {"n": 0}

    def nan_on_third_step(*args, **kwargs):
        loss, correct = real(*args, **kwargs)
        calls["n"] += 1
        return (loss * float("nan"), correct) if calls["n"] == 3 else (loss, correct)

    monkeypatch.setattr(ttds_model, "response_loss", nan_on_third_step)
    out = finetune.run(_dynamic_params(**{"train.val_users": 0, "train.max_steps": 5,
                                          **({"train.fused_optimizer": True, "train.log_every": 4} if fused else {})}))
    metrics = json.loads(Path("metrics/finetune.json").read_text())
    assert metrics["skipped_steps"] == [3] and metrics["steps"] == 5
    assert "step 3: non-finite gradient" in capsys.readouterr().err
    assert np.isfinite(out["history"][-1]["loss_llm"])
    assert all(torch.isfinite(t).all() for t in load_tensors("data/model/sid_rows.safetensors").values())


def test_log_every_reads_back_later_but_records_the_same_history(toy_root, tmp_path, monkeypatch):
    """`train.log_every` only delays the losses' read-back: the same per-step history, the
    same model; the fused optimizer trains like the default one (other rounding)."""
    runs = {}
    for name, kw in (("every", {}), ("later", {"train.log_every": 5}), ("fused", {"train.fused_optimizer": True})):
        shutil.copytree(toy_root / "data", tmp_path / name / "data")
        monkeypatch.chdir(tmp_path / name)
        runs[name] = (finetune.run(_dynamic_params(**kw)), _outputs())
    (a, out_a), (b, out_b), (c, out_c) = runs["every"], runs["later"], runs["fused"]
    assert a["history"] == b["history"] and [h["step"] for h in b["history"]] == list(range(1, 9))
    for key in out_a:
        if key not in ("items", "tok"):
            assert torch.equal(out_a[key], out_b[key])
    for ha, hc in zip(a["history"], c["history"]):
        assert ha["loss_llm"] == pytest.approx(hc["loss_llm"], rel=1e-3)
    assert a["history"][0] == c["history"][0]  # the first loss comes before any update


def test_warm_start_goes_on_from_a_saved_model_and_refuses_another(project, capsys):
    from ttds_core.errors import TTDSError

    finetune.run(_dynamic_params())  # a trained model: its SID tables moved at the refreshes
    shutil.copytree("data/model", "first")
    first = load_tensors("first/trainable.safetensors")
    assert first and any("lora_" in k for k in first) and any(k.startswith("sid.") or ".sid." in k for k in first)
    # two items swap SIDs in the saved table: the warm start must take the model's table, not data/sids
    table = read_parquet("first/item_sids.parquet")
    table.loc[[0, 1], ["codes", "suffix", "sid"]] = table.loc[[1, 0], ["codes", "suffix", "sid"]].to_numpy()
    table.to_parquet("first/item_sids.parquet", index=False)
    # every learning rate 0 and no refresh: the warm-started run must save exactly what it loaded
    frozen = _dynamic_params(**{"train.lr": 0.0, "train.embedding_lr": 0.0, "train.quantizer_lr": 0.0,
                                "train.max_steps": 2, "index.refresh_samples": 100000})
    finetune.run(frozen, warm_start="first")
    assert "warm start from first" in capsys.readouterr().err
    again = load_tensors("data/model/trainable.safetensors")
    assert set(again) == set(first) and all(torch.equal(again[k], first[k]) for k in first)
    saved = read_parquet("data/model/item_sids.parquet")
    assert saved["sid"].tolist() == table["sid"].tolist() != read_parquet("data/sids/items.parquet")["sid"].tolist()
    assert not any(".quantizers." in k for k in first)  # those are in quantizers.safetensors only
    for name in ("user_sids.parquet", "sid_rows.safetensors", "quantizers.safetensors"):
        assert Path("data/model", name).read_bytes() == Path("first", name).read_bytes()
    metrics = json.loads(Path("metrics/finetune.json").read_text())
    assert metrics["warm_start"]["from"] == "first" and len(metrics["warm_start"]["sha256"]) == 64
    # the same trainable tensors with other quantizers: another warm-start stamp (a checkpoint of
    # the first run must not be resumed by this one)
    quantizers = load_tensors("first/quantizers.safetensors")
    name = next(k for k, v in quantizers.items() if v.is_floating_point() and v.numel())
    quantizers[name] = quantizers[name] * 1.5
    save_file(quantizers, "first/quantizers.safetensors")
    finetune.run(frozen, warm_start="first")
    other = json.loads(Path("metrics/finetune.json").read_text())["warm_start"]["sha256"]
    assert other != metrics["warm_start"]["sha256"]
    # a model of other shapes, or a folder without the tensors: one line, nothing trained
    with pytest.raises(TTDSError, match="does not fit this model"):
        finetune.run(_dynamic_params(**{"lora.r": 2}), warm_start="first")
    Path("first/trainable.safetensors").unlink()
    with pytest.raises(TTDSError, match="no trainable.safetensors there"):
        finetune.run(frozen, warm_start="first")


@pytest.mark.parametrize("dynamic", [False, True])
def test_serving_derives_every_users_sid_from_all_their_interactions(project, dynamic):
    """precompute and recommend on a trained model folder, with the real derivation
    (user_profile.user_sids_of): the backbone and final quantizer, or the trained LLM."""
    from ttds_core import serve

    params = _dynamic_params(**{"index.dynamic": dynamic, "train.max_steps": 4, "serve.max_users": 2})
    finetune.run(params)
    meta = serve.run_precompute(params)
    own = read_parquet("data/model/user_sids.parquet").sort_values("user_id")
    table = read_parquet("data/serving/user_sids.parquet").sort_values("user_id")
    assert meta["user_profile"] == "fresh" and table["user_id"].tolist() == own["user_id"].tolist()
    assert table["sid"].is_unique and 0.0 <= meta["user_sids_changed"] <= 1.0
    cached = set(read_parquet("data/serving/topk.parquet")["user_id"].tolist())
    other = next(u for u in own["user_id"].tolist() if u not in cached)
    user_id, ranked, source = serve.recommend(params, str(other), 3)
    assert (user_id, source) == (other, "model") and len(ranked) == 3
    # the training-time profile: the model's own table, and another cache key
    training = {**params, "serve": {**params["serve"], "user_profile": "training"}}
    meta = serve.run_precompute(training)
    assert meta["user_sids_changed"] == 0.0
    assert read_parquet("data/serving/user_sids.parquet")["sid"].tolist() == own["sid"].tolist()


def test_max_minutes_stops_training_early_and_still_saves(project):
    out = finetune.run(_dynamic_params(**{"train.max_minutes": 0.0, "train.val_users": 2}))
    metrics = json.loads(Path("metrics/finetune.json").read_text())
    assert metrics["steps"] == 1 and metrics["stopped_by_max_minutes"] and metrics["planned_steps"] == 8
    assert out["best"]["step"] == 1 and Path("data/model/recommender.json").exists()


@pytest.mark.parametrize("kind,dynamic", [("lsh", True), ("random", False)])
def test_lsh_and_random_index_train_save_and_load(tmp_path, monkeypatch, kind, dynamic):
    """The index ablations (TT-DLSH, TT-SR) fine-tune, save and load: without a codebook
    to tie, the input and output SID rows are one tensor, which must still be saved."""
    build_toy_project(tmp_path, kind=kind)
    monkeypatch.chdir(tmp_path)
    params = _dynamic_params(**{"index.kind": kind, "index.dynamic": dynamic, "train.max_steps": 4,
                                "train.val_users": 2})
    finetune.run(params)
    rows = load_tensors("data/model/sid_rows.safetensors")
    assert torch.equal(rows["input"], rows["output"])
    rec = load_recommender(params, device="cpu")
    assert rec.item_sids["sid"].is_unique and len(rec.item_sids) == len(read_parquet("data/processed/items.parquet"))


def test_saved_tensors_are_byte_identical_across_processes(tmp_path):
    """safetensors orders its metadata map at random per process: two metadata keys must
    not make the same weights hash differently under DVC."""
    code = ("import sys, torch; from ttds_core.io import save_tensors; "
            "save_tensors(sys.argv[1], {'a': torch.arange(6.0), 'b': torch.ones(2)}, "
            "metadata={'first_id': 7, 'n_rows': 2, 'kind': 'x'})")
    paths = [tmp_path / f"t{i}.safetensors" for i in range(4)]
    for p in paths:
        subprocess.run([sys.executable, "-c", code, str(p)], check=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert len({p.read_bytes() for p in paths}) == 1


def test_train_seed_varies_training_but_not_the_validation_users(project, monkeypatch):
    val_seeds = []
    real_val = finetune.tasks.validation_samples

    def recording_val(sequences, n, seed):
        val_seeds.append(seed)
        return real_val(sequences, n, seed)

    monkeypatch.setattr(finetune.tasks, "validation_samples", recording_val)
    outputs = {}
    for name, seed in (("default", None), ("same", 42), ("other", 7)):
        finetune.run(toy_params(**{"seed": 42, "train.seed": seed, "train.max_steps": 4}))
        outputs[name] = _outputs()
    assert val_seeds == [42, 42, 42]
    for key in ("rows", "items"):
        assert np.array_equal(np.asarray(outputs["default"][key]), np.asarray(outputs["same"][key]))
    assert not torch.equal(outputs["default"]["rows"], outputs["other"]["rows"])


def test_refresh_schedule_counts_training_rows():
    """`index.refresh_samples` is in training rows: the CPU default (800 rows, batch 8)
    refreshes every 100 steps exactly as the former step count did; batch 256 every ~3 steps."""
    due = [s for s in range(1, 401) if finetune.refresh_due(s, 8, 800)]
    assert due == [100, 200, 300, 400]
    due = [s for s in range(1, 11) if finetune.refresh_due(s, 256, 800)]
    assert due == [4, 7, 10]  # 1024, 1792, 2560 rows: each crosses the next multiple of 800
    with pytest.raises(finetune.TTDSError, match="'index.refresh_every' is no longer read: replaced by 'index.refresh_samples'"):
        finetune.TrainConfig.from_params(toy_params(**{"index.refresh_every": 100}))


@pytest.mark.parametrize("fp32", [True, False])
def test_lora_fp32_adapters_sets_the_adapter_dtype(project, fp32):
    """Over a bf16 backbone the adapters are float32 (peft's default) or, with
    `lora.fp32_adapters: false`, bf16 like the backbone (no casts in every adapted layer)."""
    params = toy_params(**{"model.dtype": "bfloat16", "lora.fp32_adapters": fp32})
    cfg = finetune.TrainConfig.from_params(params)
    _, _, _, texts, x, tables = ttds_model.load_inputs(params, Path("data"), cfg.towers)
    quantizers = ttds_model.load_quantizers(Path("data"), cfg.towers, x, cfg, 2, 4)
    lm, _, _ = ttds_model.build_model(params, cfg, ttds_model.IndexState(tables=tables, x=x), texts, quantizers,
                                      Path("data/backbone"), "cpu")
    assert {p.dtype for n, p in lm.named_parameters() if "lora_" in n} == {torch.float32 if fp32 else torch.bfloat16}
