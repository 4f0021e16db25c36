"""Evaluation of models: head-to-head win rates and arena ratings under a judge (`arena.py`)."""
