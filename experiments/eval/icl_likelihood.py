"""In-context learning measured by likelihood: how much more probable the gold answer becomes as demonstrations are
added, where greedy decoding (the gold score of `llm-jax eval --config configs/eval.py:icl`) only sees the top
choice.

    python experiments/eval/icl_likelihood.py --run runs/pipeline/pretrain --icl evals/icl/base [--ks 0,1,2,4,8]

It reads the k-shot prompts that the icl evaluation wrote (`<icl>/plain_k<k>_prompts.jsonl`: the plain-text prompt
and, under `source`, the record with its gold `reference`) and scores each prompt followed by its reference and a
newline with the run's model, in one forward pass per prompt. Per k, one JSON line:

    nats_per_token   mean over prompts of −(1/n) Σ log p(answer token | prompt, earlier answer tokens)
    first_token_nll  mean −log p(the answer's first token | prompt): whether the model starts the answer at all
    newline_prob     mean p("\\n" right after the prompt): a paragraph break instead of an answer
    exact_greedy     the fraction of prompts whose every answer token is the argmax (teacher-forced)

A model that learns the task from demonstrations lowers nats_per_token as k grows; one that reads them as text
of its corpus does not.
"""
import argparse
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from llm_jax import runs
from llm_jax.model.transformer import Transformer
from llm_jax.objectives.lm import token_log_probs


PAD = 64


@functools.partial(jax.jit, static_argnums=0)
def _logits(model, params, tokens_bt):
    return model.apply(params, tokens_bt, method=Transformer.logits)


def score(run, prompt: str, answer: str):
    tokenizer = run.tokenizer
    prompt_ids = list(tokenizer.encode_with_specials(prompt))
    if prompt_ids and prompt_ids[-1] == tokenizer.eos_id:  # the text's end, not a document's: no EOS
        prompt_ids = prompt_ids[:-1]
    answer_ids = list(tokenizer.encode(answer))
    n = len(prompt_ids) + len(answer_ids)
    # right-padded to a multiple of PAD: a few compiled shapes, and causal attention leaves the real logits alone
    ids = np.zeros((1, -(-n // PAD) * PAD + 1), np.int32)
    ids[0, :n] = prompt_ids + answer_ids
    logits = _logits(run.model, run.params, jnp.asarray(ids[:, :-1]))[:, :n - 1]
    log_probs = np.asarray(token_log_probs(logits, jnp.asarray(ids[:, 1:n])))[0]
    start = len(prompt_ids) - 1
    answer_lp = log_probs[start:]
    argmax = np.asarray(jnp.argmax(logits[0, start:], axis=-1))
    newline = tokenizer.encode("\n")[-1]
    first_dist = jax.nn.softmax(logits[0, start].astype(jnp.float32))
    return dict(nats=-float(answer_lp.mean()), first=-float(answer_lp[0]), newline=float(first_dist[newline]),
                exact=bool((argmax == np.asarray(answer_ids)).all()))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="the base model's run directory")
    parser.add_argument("--icl", required=True, help="the icl evaluation's directory of this model's prompts")
    parser.add_argument("--ks", default="0,1,2,4,8")
    parser.add_argument("--n", type=int, default=256, help="prompts per k")
    args = parser.parse_args()
    run = runs.load_run(args.run)
    for k in (int(k) for k in args.ks.split(",")):
        path = os.path.join(args.icl, f"plain_k{k}_prompts.jsonl")
        rows = [json.loads(line) for line in open(path, encoding="utf-8")][:args.n]
        scores = [score(run, r["prompt"], r["source"]["reference"] + "\n") for r in rows]
        print(json.dumps(dict(k=k, prompts=len(rows), nats_per_token=np.mean([s["nats"] for s in scores]),
                              first_token_nll=np.mean([s["first"] for s in scores]),
                              newline_prob=np.mean([s["newline"] for s in scores]),
                              exact_greedy=np.mean([s["exact"] for s in scores])), default=float), flush=True)


if __name__ == "__main__":
    main()
