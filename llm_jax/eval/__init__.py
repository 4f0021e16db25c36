"""Evaluation of models: judges (`judges.py`: one protocol, `score(prompts, responses) -> scores`, with verifiable
and user-named judges), and head-to-head win rates and arena ratings under a judge (`arena.py`)."""
