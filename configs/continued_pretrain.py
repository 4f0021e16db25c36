r"""Continued pretraining: a pretrained run goes on over new-domain data mixed with replay of its original data.

    llm-jax train --config configs/pretrain.py:tiny --workdir runs/pre
    llm-jax train --config configs/continued_pretrain.py:tiny --workdir runs/cpt            # replay=0.25
    llm-jax train --config configs/continued_pretrain.py:size=tiny,replay=0 --workdir runs/cpt-r0
    llm-jax train --config configs/continued_pretrain.py:size=tiny,replay=0.5,init_from=runs/pre --workdir runs/r50 \
        --config.data.mixture.domain.train=runs/data      # a `llm-jax prepare` workdir as the new domain

Arguments: `size` (the pretraining size it starts from: the model must be the same), `init_from` (that run's
directory, default runs/pre), `replay` (the share of training rows drawn from the original corpus, in [0, 1)),
`new` and `old` (the data specs of the new domain and of the replayed corpus: default:domain, the embedded shifted
domain, and default, the embedded pretraining corpus), `steps`, `seed`.

The data is `data.mixture` with two components (llm_jax/data/mixture.py): `replay` (weight `replay`) and `domain`
(weight 1 - replay). With replay=0 the replay component is evaluated but never trained on, so every run logs
`eval_replay_loss` (forgetting of the original data) and `eval_domain_loss` (learning of the new one) beside their
entropy floors `replay_source_entropy_nats_per_token` and `domain_source_entropy_nats_per_token`; `eval_loss` is
their mixture-weighted mean. The replay corpus holds out the same documents (same hash, same eval_fraction) as the
pretraining run did, so replay never trains on the documents the base model was evaluated on.

The tokenizer is the pretraining run's (`tokenizer.path` empty: inherited through `train.init_from`); the schedule is
short, with a warmup that re-warms the optimizer's fresh moments and a peak lr a third of pretraining's.
"""
import os

from llm_jax.config_lib import ConfigError, load_config, parse_arg

_HERE = os.path.dirname(os.path.abspath(__file__))
# size: (steps, eval_every); other fields follow from the pretraining config of the size
_SCHEDULES = {"tiny": (150, 25)}


def get_config(arg=None):
    arg = parse_arg(arg, size="tiny", replay=0.25, init_from="runs/pre", new="default:domain", old="default",
                    steps=-1, seed=0)
    if not 0.0 <= arg.replay < 1.0:
        raise ConfigError(f"continued_pretrain: replay must be in [0, 1), got {arg.replay}")
    config = load_config(f"{os.path.join(_HERE, 'pretrain.py')}:size={arg.size},seed={arg.seed}")
    pretrain_steps = config.train.steps
    steps, eval_every = _SCHEDULES.get(arg.size, (max(1, pretrain_steps // 10), max(1, pretrain_steps // 50)))
    if arg.steps > 0:
        steps = arg.steps
    config.train.update(steps=steps, eval_every=eval_every, checkpoint_every=max(eval_every, steps // 3),
                        log_every=min(config.train.log_every, eval_every), init_from=arg.init_from)
    config.optim.update(lr=config.optim.lr / 3, warmup_steps=max(1, steps // 10))
    config.tokenizer.path = ""   # inherit the tokenizer of train.init_from
    config.data.train = ""
    config.data.mixture.replay = dict(train=arg.old, weight=float(arg.replay), eval="",
                                      eval_fraction=float(config.data.eval_fraction))
    # More held-out documents than the 2% default: the domain corpus is half the size of the original.
    config.data.mixture.domain = dict(train=arg.new, weight=1.0 - float(arg.replay), eval="", eval_fraction=0.05)
    return config
