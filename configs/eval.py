r"""Evaluations of finished runs with the project's own evaluators (llm_jax/eval/configured.py runs them).

    llm-jax eval --config configs/eval.py:arena --workdir evals/arena
    llm-jax eval --config configs/eval.py:arena,pipeline=runs/p2 --workdir evals/p2 \
        --config.competitors.ppo.run=runs/ppo_kl01 --config.n_prompts=512
    llm-jax eval --config configs/eval.py:win_rate,a=runs/ppo,b=runs/sft --workdir evals/ppo_vs_sft
    llm-jax eval --config configs/eval.py:generative,run=runs/sft,task=qa.jsonl --workdir evals/qa \
        --config.judge=exact_match --config.k=4
    llm-jax eval --config configs/eval.py:perplexity,run=runs/cpt,data=default:domain --workdir evals/ppl
    llm-jax eval --config configs/eval.py:icl --workdir evals/icl

Kinds (`kind`, the first argument):

    arena       the stage models of a pipeline directory (`pipeline`, default runs/pipeline): base, the pretrain
                run answering 4-shot in plain text (a base model has no chat template), and sft, ppo, dpo in their
                chat template; judged by gold on the first 256 held-out prompts of the embedded task, greedy; win
                rates against sft, Bradley–Terry ratings for all (eval/compare.py). A competitor's run is
                `{pipeline}/<stage>` unless overridden (--config.competitors.<name>.run=DIR); one whose directory
                does not exist is skipped with a warning, or an error with --config.require_all=True.
    win_rate    two runs, `a` and `b` (their competitors' fields as in arena): a's win rate against b
    generative  one run's k-shot score on a task file (`task`: jsonl records {"prompt", "reference", ...};
                `default_task`: the embedded task's held-out prompts) under a judge (gold, exact_match,
                regex_match, numeric_match, module:function, a reward run) (eval/generative.py)
    perplexity  one run's loss per token and perplexity on a data spec (`data`; '' the run's own training data,
                its mixture's components each; `mixture`: name -> spec for components of one's own; `split`: all
                or eval, the documents the run's config holds out) (eval/perplexity.py)
    icl         in-context learning on the embedded task: the base run's gold score at k = 0, 1, 2, 4, 8
                demonstrations in plain text, and the sft run's zero-shot score in its chat template

Arguments: `kind`, `pipeline`, and shortcuts for the fields most often set: `run`, `a`, `b`, `task`, `data`.
`n_prompts` 0 means every record; `{pipeline}` in a run is the pipeline directory.
"""
import ml_collections

from llm_jax.config_lib import ConfigError, parse_arg

KINDS = ("arena", "win_rate", "generative", "perplexity", "icl")
STAGE_RUN = "{pipeline}/%s"


def competitor(run: str, chat_template: bool = True, few_shot: int = 0) -> dict:
    """A model in a comparison: its run directory, whether it answers in its chat template, its demonstrations."""
    return dict(run=run, chat_template=chat_template, few_shot=few_shot)


def _generation(n_prompts: int) -> dict:
    """What every generative kind shares: greedy answers judged by gold (the embedded task's program)."""
    return dict(n_prompts=n_prompts, judge="gold", stop="\n", batch_size=64, seed=0,
                bootstrap=1000, confidence=0.95,
                sampling=dict(max_new_tokens=16, temperature=0.0, top_k=0, top_p=1.0))


def get_config(arg=None):
    arg = parse_arg(arg, kind="arena", pipeline="runs/pipeline", run="", a="", b="", task="default_task", data="")
    if arg.kind not in KINDS:
        raise ConfigError(f"eval config kind {arg.kind!r} is not one of {list(KINDS)}")
    fields = dict(kind=arg.kind, pipeline=arg.pipeline)
    if arg.kind == "arena":
        fields.update(_generation(256), prompts="default_task", baseline="sft", require_all=False, plots=True,
                      competitors=dict(
                          base=competitor(STAGE_RUN % "pretrain", chat_template=False, few_shot=4),
                          sft=competitor(STAGE_RUN % "sft"), ppo=competitor(STAGE_RUN % "ppo"),
                          dpo=competitor(STAGE_RUN % "dpo")))
    elif arg.kind == "win_rate":
        fields.update(_generation(256), prompts="default_task", baseline="b", require_all=True, plots=True,
                      competitors=dict(a=competitor(arg.a), b=competitor(arg.b)))
    elif arg.kind == "generative":
        fields.update(_generation(0), run=arg.run, task=arg.task, k=0, pool="", chat_template=True)
    elif arg.kind == "perplexity":
        fields.update(run=arg.run, data=arg.data, mixture=ml_collections.ConfigDict(), split="all", batch_size=8,
                      max_batches=0)
    else:
        fields.update(_generation(256), task=arg.task, base_run=STAGE_RUN % "pretrain", sft_run=STAGE_RUN % "sft",
                      ks=(0, 1, 2, 4, 8), base_chat_template=False, require_all=False)
    return ml_collections.ConfigDict(fields)
