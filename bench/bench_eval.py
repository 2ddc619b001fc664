"""Ranking speed: the ranking engine against the previous HF-`generate` ranker, and the cost
of the trie constraint.

    python -m bench.bench_eval [--users 64] [--batch-size 16] [--beams 20] [--full-trie] [--out FILE]

Uses the trained recommender in `data/model` (`--model-dir`) when it exists; otherwise the backbone in
`data/backbone` with the SID vocabulary added and random SID rows and random SIDs for
the real catalogue of `data/processed` (`--synthetic` forces this). Speed does not depend
on what the weights learned, so the synthetic model measures the same thing.

On the same test cases (one split), in one run:
- `rank_cases` as `evaluate` runs it (one prefill, an unmasked and a masked search per case)
  with the engine and with the previous HF ranker (`bench.hf_ranker`): seconds per case;
- the engine's search alone (prefill excluded), constrained and with the tables switched
  off (`constrained=False`: the same beam search, every token of a depth allowed): the
  constraint's overhead;
- the memory of the SID tables.
`--full-trie` adds a catalogue the size of full Games (16,859 items, uniform random codes,
collisions resolved with suffixes as `build_sids` does): table memory and build time, and
the constrained vs unconstrained search on the same model.
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
from ttds_core.cases import eval_cases, select_users
from ttds_core.io import read_parquet, write_json
from ttds_core.prompts import seqrec_packed
from ttds_core.ranker import PromptBuilder, Ranker, SidTables, item_token_ids, rank_cases, ranker_for

GAMES_ITEMS = 16_859


def synthetic_recommender(params: dict, processed_dir: Path, seed: int, n_items: int | None = None):
    """Backbone + SID vocabulary with random rows; random unique SIDs for every item and user
    (of `data/processed`, or `n_items` made-up items)."""
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
        if tower == "item" and n_items is not None:
            ids = np.arange(n_items)
        else:
            ids = read_parquet(processed_dir / f"{name}.parquet")[f"{tower}_id"].to_numpy()
        codes = rng.integers(0, size, size=(len(ids), length))
        tables[tower] = sid_table(ids, codes, resolve_collisions(codes, ids, max_suffix), tower)
    return SimpleNamespace(model=model, tokenizer=tok, item_sids=tables["item"], user_sids=tables["user"])


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def search_times(ranker: Ranker, prompts: list, batch_size: int) -> dict:
    """Prefill, constrained and unconstrained search (both masks' worth: two searches) per batch."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    batches = [[prompts[i] for i in order[j:j + batch_size]] for j in range(0, len(order), batch_size)]
    encoded, prefill_s = timed(lambda: [ranker.encode(b) for b in batches])
    _, constrained_s = timed(lambda: [ranker.search(b) for b in encoded])
    _, free_s = timed(lambda: [ranker.search(b, constrained=False) for b in encoded])
    return {"prefill_seconds": round(prefill_s, 2), "constrained_search_seconds": round(constrained_s, 2),
            "unconstrained_search_seconds": round(free_s, 2),
            "constraint_overhead": round(constrained_s / free_s - 1.0, 3)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--users", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=None, help="default: eval.batch_size")
    ap.add_argument("--beams", type=int, default=None, help="default: eval.beams")
    ap.add_argument("--scoring", default=None, choices=("full", "sid"), help="default: eval.scoring")
    ap.add_argument("--skip-hf", action="store_true", help="do not time the previous HF ranker")
    ap.add_argument("--full-trie", action="store_true", help="also a full-Games-sized random catalogue")
    ap.add_argument("--model-dir", default="data/model", help="trained recommender folder")
    ap.add_argument("--synthetic", action="store_true", help="ignore the trained model, use random SIDs")
    ap.add_argument("--out", default=None, help="also write the results as JSON here")
    args = ap.parse_args(argv)

    params = load_params(args.params)
    seed = get(params, "seed", int)
    seed_everything(seed)
    processed = Path("data/processed")
    if not args.synthetic and (Path(args.model_dir) / "recommender.json").is_file():
        from ttds_core.recommender import load_recommender

        rec, source = load_recommender(params, model_dir=args.model_dir), "trained recommender"
    else:
        rec, source = synthetic_recommender(params, processed, seed), "backbone + random SIDs"
    beams = args.beams or get(params, "eval.beams", int)
    batch_size = args.batch_size or get(params, "eval.batch_size", int)
    scoring = args.scoring or get(params, "eval.scoring", str)
    max_history = get(params, "data.max_history", int)

    users = select_users(read_parquet(processed / "sequences.parquet"), args.users, seed)
    cases = eval_cases(users, "test", max_history)
    build = PromptBuilder(rec.tokenizer, rec.item_sids, rec.user_sids, get(params, "train.template", int),
                          seqrec_packed(params))
    ranker, tables = ranker_for(rec.model, rec.tokenizer, rec.item_sids, beams, scoring)
    prompts = [build(c.user_id, c.history) for c in cases]
    n = len(cases)
    result = {"model": source, "device": str(ranker.device), "threads": torch.get_num_threads(),
              "users": n, "items": len(tables), "beams": beams, "batch_size": batch_size, "scoring": scoring,
              "sid_depth": tables.depth, "mean_prompt_tokens": round(float(np.mean([len(p) for p in prompts])), 1),
              "tables_mb": round(tables.nbytes / 2**20, 3)}

    # 1. the evaluate loop (both masks per prefill), engine vs previous ranker
    _, new_s = timed(lambda: rank_cases(ranker, build, cases, batch_size))
    result["engine_seconds_per_case_both_masks"] = round(new_s / n, 4)
    if not args.skip_hf:
        from bench.hf_ranker import ConstrainedRanker, build_item_trie, rank_cases_hf

        hf = ConstrainedRanker(rec.model, rec.tokenizer, build_item_trie(rec.item_sids, rec.tokenizer), beams, scoring)
        _, old_s = timed(lambda: rank_cases_hf(hf, build, cases, batch_size))
        result["hf_seconds_per_case_both_masks"] = round(old_s / n, 4)
        result["speedup"] = round(old_s / new_s, 2)

    # 2. the constraint's cost: the same search with and without the tables
    result.update(search_times(ranker, prompts, batch_size))

    # 2b. on a GPU: host synchronisations of one masked search (expected: the exclusion lists'
    # upload before the loop and the final transfer of the ranked lists, none inside the loop)
    if ranker.device.type == "cuda":
        import warnings

        batch = ranker.encode(prompts[:batch_size])
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ranker.search(batch, [c.seen for c in cases[:batch_size]])
        torch.cuda.set_sync_debug_mode(0)
        result["host_syncs_per_masked_search"] = len(caught)

    # 3. a catalogue the size of full Games
    if args.full_trie:
        big = synthetic_recommender(params, processed, seed, n_items=GAMES_ITEMS)
        seqs = item_token_ids(big.item_sids, big.tokenizer)
        big_tables, build_s = timed(lambda: SidTables(seqs, big.tokenizer.eos_token_id))
        rng = np.random.default_rng(seed)
        big_build = PromptBuilder(big.tokenizer, big.item_sids, None, get(params, "train.template", int),
                                  seqrec_packed(params))
        big_prompts = [big_build(0, rng.choice(GAMES_ITEMS, size=max_history, replace=False).tolist())
                       for _ in range(n)]
        big_ranker = Ranker(big.model, big.tokenizer, big_tables, beams, scoring)
        result["full_games_trie"] = {"items": len(big_tables), "nodes_per_depth": big_tables.n_nodes,
                                     "tables_mb": round(big_tables.nbytes / 2**20, 1),
                                     "build_seconds": round(build_s, 2),
                                     **search_times(big_ranker, big_prompts, batch_size)}
    print(json.dumps(result, indent=2))
    if args.out:
        write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
