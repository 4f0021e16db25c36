"""Evaluation of models:

    judges.py      what scores an answer: one protocol, `score(prompts, responses) -> scores`; verifiable judges,
                   the embedded task's gold program, a reward model, user functions named module:function
    arena.py       head-to-head arithmetic: win rates and Bradley–Terry arena ratings with bootstrap intervals
    perplexity.py  a run's loss per token and perplexity on any data spec, per mixture component
    generative.py  jsonl tasks answered k-shot (chat turns or plain text) and judged; in-context-learning curves
    compare.py     runs head to head on the same prompts under one judge: win rates, ratings, arena.md/json/png
    configured.py  the evaluations of configs/eval.py (`llm-jax eval`)
    during_training.py  generative evaluations of `train.generative_evals`, run with the params at every eval
    harness.py     lm-evaluation-harness over any run
"""
