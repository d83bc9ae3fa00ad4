#!/usr/bin/env python3
"""Generate-mode evaluation in PyTorch/transformers, as tsq's peer for `tsq bench eval` on a
`mode: generate` stage: greedy generation of each item's rendered prompt the way
lm-evaluation-harness's HF backend runs `generate_until` (prompts sorted longest first,
left-padded batches, each batch generating until every row has hit EOS or the budget; the
stop strings cut the text afterwards), timed from the first batch to the last.

Usage: python scripts/torch_generate_bench.py ITEMS.jsonl [--batch 16] [--source gguf|f32]
       [--threads 2] [--out PER_ITEM.jsonl]
Items: JSONL {"id", "prompt", "max_new_tokens", "stop"} as `tsq bench eval --write-items` writes
them for a generate-mode stage. Prints one JSON line (items, new tokens, seconds, items/s);
`--out` writes each item's completion for `tsq bench eval --peer-items`.
Runs in shared/peers' virtualenv and imports its smol_common.py (PEERS_DIR, default
../shared/peers beside this repository).
"""
import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.environ.get("PEERS_DIR", os.path.join(HERE, "..", "..", "shared", "peers")))
import smol_common as sc  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("items")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--source", default="gguf")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out")
    args = ap.parse_args()

    import torch

    items = [json.loads(line) for line in open(args.items) if line.strip()]
    tok = sc.load_tokenizer()
    model = sc.load_model(args.source, args.threads)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    prompts = [tok(it["prompt"], add_special_tokens=False)["input_ids"] for it in items]
    order = sorted(range(len(items)), key=lambda i: -len(prompts[i]))
    completions = [None] * len(items)
    new_tokens = 0

    t0 = time.perf_counter()
    with torch.inference_mode():
        for b in range(0, len(order), args.batch):
            chunk = order[b:b + args.batch]
            width = max(len(prompts[i]) for i in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for n, i in enumerate(chunk):
                p = prompts[i]
                ids[n, width - len(p):] = torch.tensor(p)
                mask[n, width - len(p):] = 1
            budget = max(items[i]["max_new_tokens"] for i in chunk)
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=budget,
                                 do_sample=False, pad_token_id=pad, eos_token_id=tok.eos_token_id)
            for n, i in enumerate(chunk):
                gen = out[n, width:].tolist()[:items[i]["max_new_tokens"]]
                if tok.eos_token_id in gen:
                    gen = gen[:gen.index(tok.eos_token_id)]
                new_tokens += len(gen)
                text = tok.decode(gen, skip_special_tokens=False)
                for s in items[i].get("stop") or []:
                    if s in text:
                        text = text[:text.index(s)]
                completions[i] = text
    seconds = time.perf_counter() - t0

    print(json.dumps({"bench": "torch_generate_bench", "source": args.source, "threads": args.threads,
                      "batch": args.batch, "items": len(items), "new_tokens": new_tokens,
                      "seconds": round(seconds, 3), "tokens_per_s": round(new_tokens / seconds, 1),
                      "items_per_s": round(len(items) / seconds, 2),
                      "peak_rss_mib": round(sc.peak_rss_mib(), 1)}))
    if args.out:
        with open(args.out, "w") as f:
            for it, c in zip(items, completions):
                f.write(json.dumps({"id": it.get("id"), "completion": c}) + "\n")


if __name__ == "__main__":
    main()
