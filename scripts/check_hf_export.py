#!/usr/bin/env python3
"""Checks that an expert exported by `tsq expert export` loads in Hugging Face transformers and
gives the same next-token log-probabilities as `tsq score --expert` on the same token ids.

Not part of the test suite (it needs torch): run it in a throwaway virtualenv, e.g.
    python3 -m venv ~/.cache/tsq-peers/venv && ~/.cache/tsq-peers/venv/bin/pip install torch transformers safetensors
    tsq expert export --expert runs/quickstart/train.reasoning/expert.safetensors --out /tmp/export
    ~/.cache/tsq-peers/venv/bin/python scripts/check_hf_export.py --tsq target/release/tsq \
        --expert runs/quickstart/train.reasoning/expert.safetensors --export /tmp/export
Prints one JSON line; exits 1 when a log-probability differs by more than --tolerance.
"""

import argparse
import json
import subprocess
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

PAIRS = [
    ("Question: Which number is larger, 17 or 71?\nAnswer:", " 71"),
    ("Question: What does print(2 + 3) output in Python?\nAnswer:", " 5"),
    (
        "The capital of France is",
        " Paris, a city on the Seine known for its museums, cafes and the Eiffel Tower.",
    ),
    ("def add(a, b):\n", "    return a + b\n"),
]


def tsq_scores(tsq, model, expert, prompt, continuation):
    args = [tsq, "score", "--prompt", prompt, "--continuation", continuation, "--format", "json"]
    if model:
        args += ["--model", model]
    if expert:
        args += ["--expert", expert]
    out = subprocess.run(args, check=True, capture_output=True, text=True).stdout
    doc = json.loads(out)
    score = doc["scores"][0]
    return doc["prompt_ids"], score["token_ids"], score["logprobs"]


def hf_logprobs(model, prompt_ids, continuation_ids):
    ids = torch.tensor([prompt_ids + continuation_ids])
    with torch.no_grad():
        logits = model(ids).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)
    start = len(prompt_ids)
    return [logp[start - 1 + k, t].item() for k, t in enumerate(continuation_ids)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tsq", required=True)
    ap.add_argument("--expert", required=True)
    ap.add_argument("--export", required=True)
    ap.add_argument("--model", help="the base model as tsq takes it (default: tsq's, SmolLM2)")
    ap.add_argument("--tolerance", type=float, default=1e-4)
    a = ap.parse_args()
    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(a.export, dtype=torch.float32)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(a.export)
    worst, moved, tokens, same_ids = 0.0, 0.0, 0, True
    for prompt, continuation in PAIRS:
        prompt_ids, cont_ids, tsq_expert = tsq_scores(a.tsq, a.model, a.expert, prompt, continuation)
        _, _, tsq_base = tsq_scores(a.tsq, a.model, None, prompt, continuation)
        hf = hf_logprobs(model, prompt_ids, cont_ids)
        worst = max(worst, max(abs(x - y) for x, y in zip(hf, tsq_expert)))
        # How far the expert moved the model: the check must tell the two apart.
        moved = max(moved, max(abs(x - y) for x, y in zip(tsq_base, tsq_expert)))
        tokens += len(cont_ids)
        # tsq tokenizes prompt and continuation apart (as lm-evaluation-harness does).
        same_ids &= tokenizer(prompt)["input_ids"] == prompt_ids
        same_ids &= tokenizer(continuation, add_special_tokens=False)["input_ids"] == cont_ids
    result = {
        "export": a.export,
        "pairs": len(PAIRS),
        "tokens": tokens,
        "max_abs_logprob_diff_hf_vs_tsq": worst,
        "max_abs_logprob_diff_expert_vs_base": moved,
        "hf_tokenizer_gives_same_ids": same_ids,
        "tolerance": a.tolerance,
        "ok": worst <= a.tolerance,
        "transformers": __import__("transformers").__version__,
        "torch": torch.__version__,
    }
    print(json.dumps(result))
    sys.exit(0 if result["ok"] else 1)


if __name__ == "__main__":
    main()
