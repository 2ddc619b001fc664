"""Evaluation throughput and the cost of the trie constraint.

    python -m bench.bench_eval [--users 64] [--batch-size 16] [--beams 20] [--out FILE]

Uses the trained recommender in `data/model` (`--model-dir`) when it exists; otherwise the backbone in
`data/backbone` with the SID vocabulary added and random SID rows and random SIDs for
the real catalogue of `data/processed` (`--synthetic` forces this). Speed does not depend
on what the weights learned, so the synthetic model measures the same thing.

Reports users/s of the evaluate loop (one prefill + unmasked + masked search per case),
and, on the same prompts, the time of constrained vs unconstrained beam search (same
beams, same number of new tokens) and the time spent inside the trie callback.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from ttds_core.config import get, load_params, seed_everything
from ttds_core.decode import ConstrainedRanker, build_item_trie
from ttds_core.evaluate import PromptBuilder, eval_cases, rank_cases, select_users
from ttds_core.io import read_parquet, write_json
from ttds_core.prompts import seqrec_packed


def synthetic_recommender(params: dict, processed_dir: Path, seed: int):
    """Backbone + SID vocabulary with random rows; random unique SIDs for every item and user."""
    from ttds_core.backbone import load_backbone
    from ttds_core.sids import resolve_collisions, sid_table
    from ttds_core.tokens import tower_vocabulary
    from ttds_core.vocab import extend_vocabulary

    model, tok = load_backbone(params)
    length = get(params, "index.length", int)
    size = get(params, "index.codebook_size", int)
    max_suffix = get(params, "index.max_suffix", int)
    new = tower_vocabulary("item", length, size, max_suffix) + tower_vocabulary("user", length, size, max_suffix)
    first = extend_vocabulary(model, tok, new)[0]
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb[first:] = torch.randn_like(emb[first:]) * emb[:first].std()
    rng = np.random.default_rng(seed)
    tables = {}
    for tower, name in (("item", "items"), ("user", "users")):
        ids = read_parquet(processed_dir / f"{name}.parquet")[f"{tower}_id"].to_numpy()
        codes = rng.integers(0, size, size=(len(ids), length))
        tables[tower] = sid_table(ids, codes, resolve_collisions(codes, ids, max_suffix), tower)
    return SimpleNamespace(model=model, tokenizer=tok, item_sids=tables["item"], user_sids=tables["user"])


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--users", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=None, help="default: eval.batch_size")
    ap.add_argument("--beams", type=int, default=None, help="default: eval.beams")
    ap.add_argument("--scoring", default=None, choices=("full", "sid"), help="default: eval.scoring")
    ap.add_argument("--skip-loop", action="store_true", help="only time the searches")
    ap.add_argument("--model-dir", default="data/model", help="trained recommender folder")
    ap.add_argument("--synthetic", action="store_true", help="ignore the trained model, use random SIDs")
    ap.add_argument("--out", default=None, help="also write the results as JSON here")
    args = ap.parse_args(argv)

    params = load_params(args.params)
    seed = get(params, "seed", int)
    seed_everything(seed)
    torch.set_num_threads(torch.get_num_threads())
    processed = Path("data/processed")
    if not args.synthetic and (Path(args.model_dir) / "recommender.json").is_file():
        from ttds_core.recommender import load_recommender

        rec, source = load_recommender(params, model_dir=args.model_dir), "trained recommender"
    else:
        rec, source = synthetic_recommender(params, processed, seed), "backbone + random SIDs"
    beams = args.beams or get(params, "eval.beams", int)
    batch_size = args.batch_size or get(params, "eval.batch_size", int)
    max_history = get(params, "data.max_history", int)

    users = select_users(read_parquet(processed / "sequences.parquet"), args.users, seed)
    cases = eval_cases(users, "test", max_history)
    trie = build_item_trie(rec.item_sids, rec.tokenizer)
    scoring = args.scoring or get(params, "eval.scoring", str)
    ranker = ConstrainedRanker(rec.model, rec.tokenizer, trie, beams, scoring)
    build = PromptBuilder(rec.tokenizer, rec.item_sids, rec.user_sids, get(params, "train.template", int),
                          seqrec_packed(params))
    prompts = [build(c.user_id, c.history) for c in cases]

    # 1. the evaluate loop as the stage runs it: both masking modes per prefill
    loop_s = float("nan")
    if not args.skip_loop:
        _, loop_s = timed(lambda: rank_cases(ranker, build, cases, batch_size, modes=(False, True)))

    # 2. constrained vs unconstrained beam search on the same batches (prefill excluded)
    calls = {"n": 0, "s": 0.0}
    allowed = trie.allowed

    def counting_allowed(tokens, exclusion=None):
        start = time.perf_counter()
        out = allowed(tokens, exclusion)
        calls["n"] += 1
        calls["s"] += time.perf_counter() - start
        return out

    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    batches = [[prompts[i] for i in order[j:j + batch_size]] for j in range(0, len(order), batch_size)]
    encoded, prefill_s = timed(lambda: [ranker.encode(b) for b in batches])
    trie.allowed = counting_allowed
    _, constrained_s = timed(lambda: [ranker.search(b) for b in encoded])
    trie.allowed = allowed
    # unconstrained: the model may emit EOS anywhere; force the same number of new tokens
    ranker.config.min_new_tokens = ranker.config.max_new_tokens
    _, free_s = timed(lambda: [ranker.search(b, constrained=False) for b in encoded])
    ranker.config.min_new_tokens = 0

    n = len(cases)
    # the constrained search may stop early (every beam finished); the unconstrained one
    # runs exactly new_tokens steps, so compare per decoding step too
    steps = calls["n"] / (n * beams)
    per_step = (constrained_s / steps) / (free_s / ranker.config.max_new_tokens)
    result = {
        "model": source, "device": str(next(rec.model.parameters()).device), "threads": torch.get_num_threads(),
        "users": n, "items": len(trie), "beams": beams, "batch_size": batch_size, "scoring": scoring,
        "new_tokens": ranker.config.max_new_tokens,
        "mean_prompt_tokens": round(float(np.mean([len(p) for p in prompts])), 1),
        # evaluate-stage throughput: users per second for one split, masked + unmasked
        "eval_loop_users_per_s": round(n / loop_s, 3),
        "eval_loop_seconds": round(loop_s, 2),
        "prefill_seconds": round(prefill_s, 2),
        "constrained_search_seconds": round(constrained_s, 2),
        "unconstrained_search_seconds": round(free_s, 2),
        "constraint_overhead": round(constrained_s / free_s - 1.0, 3),
        "constrained_steps": round(steps, 2),
        "constraint_overhead_per_step": round(per_step - 1.0, 3),
        "trie_callback_seconds": round(calls["s"], 3),
        "trie_callback_calls": calls["n"],
    }
    print(json.dumps(result, indent=2))
    if args.out:
        write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
