"""The pipeline's summary (llm_jax/pipeline.py): one markdown row a stage, from its stage.json (its wall time and
what it measured), the total, and for a config with rounds the rounds table (`rounds_summary`, `format_rounds`).
"""
from __future__ import annotations

import os

from llm_jax.objectives import fmt as _f
from llm_jax.objectives import gold_text as _gold
from llm_jax.objectives import table_row_of


def _judged_by(s: dict) -> str:
    return "the gold judge" if s.get("judge") == "gold" else f"judge {s.get('judge')}"


def _pairs_row(m: dict, s: dict) -> str:
    decided, agreement = m.get("gold_decided"), m.get("gold_agreement")
    agree = "n/a" if decided is None or agreement is None else f"{round(decided * agreement):,} of {decided:,}"
    return (f"{m.get('pairs', 0):,} pairs from {m.get('prompts_with_pairs', 0):,} of {m.get('count', 0):,} prompts "
            f"× {m.get('k')} samples; gold agrees on {agree} ({_judged_by(s)}); {_f(m.get('samples_per_s'), '.1f')} "
            "samples/s")


def _rejection_row(m: dict, s: dict) -> str:
    return (f"kept {m.get('kept', 0):,} of {m.get('count', 0):,} prompts × {m.get('k')} samples ({_judged_by(s)}); "
            f"judge's score kept {_f(m.get('reward_kept'))}, all {_f(m.get('reward_mean'))}; gold kept "
            f"{_f(m.get('gold_score_kept'))}, all {_f(m.get('gold_score'))}, best possible "
            f"{_f(m.get('gold_score_oracle'))}; {_f(m.get('samples_per_s'), '.1f')} samples/s")


def _arena_row(m: dict, s: dict) -> str:
    """Ratings best first with their intervals, then each model's win rate against the baseline."""
    def interval(e: dict, spec: str) -> str:
        return "" if e.get("ci") is None else f" [{format(e['ci'][0], spec)}, {format(e['ci'][1], spec)}]"
    ratings = sorted(s.get("ratings", {}).items(), key=lambda item: -item[1]["value"])
    score = "gold" if s.get("judge") == "gold" else "score"
    rated = "; ".join(f"{n} {r['value']:.0f}{interval(r, '.0f')} ({score} {_f(s['mean_scores'][n]['value'])})"
                      for n, r in ratings)
    wins = "; ".join(f"{n} {w['rate']['value']:.2f}{interval(w['rate'], '.2f')}"
                     for n, w in s.get("win_rates", {}).items())
    return (f"Elo {rated}. Win rate against {s.get('baseline')}: {wins} ({s.get('n_prompts')} held-out prompts, "
            f"{_judged_by(s)})")


def _select_row(m: dict, s: dict) -> str:
    went_on = "the incumbent stays" if s.get("winner") == s.get("incumbent") else f"replaces {s.get('incumbent')}"
    return f"**{s.get('winner')}** goes on ({went_on}). {_arena_row(m, s)}"


_ROWS = {  # what the table shows of each kind of stage that is not an objective's train stage (those: the
    # objective's `table_row`), from its stage.json metrics and summary
    "pairs": _pairs_row,
    "rejection": _rejection_row,
    "import": lambda m, s: (f"{s.get('family')} checkpoint, {_f(m.get('params'), ',')} params, "
                            f"{_f(m.get('gb_per_s'), '.2f')} GB/s"),
    "arena": _arena_row,
    "select": _select_row,
    "average": lambda m, s: (f"mean of {', '.join(os.path.basename(x['run']) for x in s.get('sources', []))} "
                             f"(steps {', '.join(str(x['step']) for x in s.get('sources', []))}), "
                             f"{_f(m.get('params'), ',')} params"),
}


def _row(record: dict) -> str:
    m = record["metrics"]
    key = record.get("objective") or record["kind"]
    show = _ROWS.get(key) or table_row_of(key)
    if show:
        text = show(m, record.get("summary") or {})
    else:
        text = ", ".join(f"{k} {_f(v, '.4g')}" for k, v in sorted(m.items()))
    if "gold_greedy" in m and "gold" not in text:  # a stage that `evaluate`s without its own row format
        text += f"; {_gold(m)}"
    return text


def _selection(record: dict) -> dict:
    """A select stage's choice as the rounds table shows it: every model's rating and mean score, the incumbent,
    the winner."""
    s = record["summary"]
    models = {n: dict(rating=r["value"], mean_score=s["mean_scores"][n]["value"]) for n, r in s["ratings"].items()}
    return dict(stage=record["stage"], incumbent=s["incumbent"], winner=s["winner"], models=models,
                judge=s["judge"], n_prompts=s["n_prompts"], margin=s.get("margin", 0.0))


def rounds_summary(config, records: dict) -> list[dict]:
    """Per round of `config.rounds` (none without it): its stages, the greedy and sampled gold scores of those
    that evaluate, its rejection stages' kept count and gold scores of the kept answers and of all samples, and
    its select stage's choice (`selection`: each model's rating and mean score, the incumbent and the winner;
    None without one)."""
    rounds = []
    for number, names in enumerate(config.get("rounds") or ()):
        metrics = {n: records[n]["metrics"] for n in names}
        gold = {n: dict(greedy=m["gold_greedy"], sampled=m.get("gold_sampled")) for n, m in metrics.items()
                if "gold_greedy" in m}
        rejection = {n: {k: metrics[n].get(k) for k in ("kept", "count", "gold_score_kept", "gold_score")}
                     for n in names if records[n]["kind"] == "rejection"}
        selection = next((_selection(records[n]) for n in names if records[n]["kind"] == "select"), None)
        rounds.append(dict(round=number, stages=list(names), gold=gold, rejection=rejection, selection=selection))
    return rounds


def _selection_cell(selection: dict | None) -> str:
    if selection is None:
        return ""
    models = sorted(selection["models"].items(), key=lambda item: -item[1]["rating"])
    rated = "; ".join(f"{n}{' (incumbent)' if n == selection['incumbent'] else ''} {v['rating']:.0f} "
                      f"({_f(v['mean_score'])})" for n, v in models)
    return f"{rated} → **{selection['winner']}**"


def format_rounds(rounds: list[dict]) -> list[str]:
    """The rounds table's lines (none without rounds); a column of each round's selection when it has one."""
    if not rounds:
        return []
    selects = any(r.get("selection") for r in rounds)
    head = ("| round | rejection sampling: kept of prompts; gold of kept / of all samples | gold greedy (sampled) |"
            + (" selection: Elo (mean score) → the model that goes on |" if selects else ""))
    lines = ["", head, "|---:|---|---|" + ("---|" if selects else "")]
    for r in rounds:
        kept = "; ".join(f"{n} {_f(v['kept'], ',')} of {_f(v['count'], ',')}; {_f(v['gold_score_kept'])} / "
                         f"{_f(v['gold_score'])}" for n, v in r["rejection"].items())
        gold = " → ".join(f"{n} {_f(g['greedy'])} ({_f(g['sampled'])})" for n, g in r["gold"].items())
        lines.append(f"| {r['round']} | {kept} | {gold} |" + (f" {_selection_cell(r.get('selection'))} |"
                                                              if selects else ""))
    return lines


def format_table(config, records: dict, total: float, rounds: list[dict]) -> str:
    """One markdown row a stage (its wall time, as recorded when it ran) and the total; then one row a round of
    `rounds` (`rounds_summary`; none without rounds)."""
    prompts = config.eval.n_prompts or "all"
    lines = ["| stage | seconds | result |", "|---|---:|---|"]
    lines += [f"| {name} | {r['seconds']:.0f} | {_row(r)} |" for name, r in records.items()]
    lines.append(f"| total | {total:.0f} | |")
    lines += format_rounds(rounds)
    lines.append("")
    lines.append(f"Gold scores after the stages that evaluate: {prompts} held-out prompts, greedy and sampled "
                 f"(temperature {config.eval.temperature}, seed {config.eval.seed}), {config.eval.max_new_tokens} "
                 "new tokens. RL stages': their own evals (rl.n_eval_prompts, rl.max_new_tokens), before = the SFT policy.")
    return "\n".join(lines) + "\n"
