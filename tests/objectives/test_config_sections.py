"""Each objective owns its config section and its row of the pipeline table; base_config and pipeline gather them."""
import subprocess
import sys

import pytest

from llm_jax import config_lib, objectives
from llm_jax.configs_common import base_config
from llm_jax.pipeline_table import format_table


def test_each_section_is_its_objectives_declared_defaults():
    config = base_config()
    declared = {}
    for name in objectives.OBJECTIVES:
        module = objectives.get_objective(name)
        if hasattr(module, "CONFIG_SECTION"):
            declared[module.CONFIG_SECTION] = module.CONFIG_DEFAULTS
            # what base_config read from the source without importing the module is what the module holds
            assert config[module.CONFIG_SECTION].to_dict() == module.CONFIG_DEFAULTS
    assert set(declared) == {"reward", "dpo", "rl"}
    assert dict(objectives.config_sections()) == declared


def test_objective_fields_are_typed_and_a_typo_is_an_error():
    c = config_lib.load("configs/dpo.py:tiny", ["dpo.beta=0.5", "rl.kl_coef=0.1"])
    assert c.dpo.beta == 0.5 and isinstance(c.dpo.beta, float) and c.rl.kl_coef == 0.1
    with pytest.raises(config_lib.ConfigError, match="config has no field 'dpo.betta'"):
        config_lib.load("configs/dpo.py:tiny", ["dpo.betta=0.5"])
    with pytest.raises(config_lib.ConfigError, match="field 'dpo.beta' is a float; got 'big'"):
        config_lib.load("configs/dpo.py:tiny", ["dpo.beta=big"])


def test_loading_a_config_does_not_import_jax():
    code = ("import sys; from llm_jax.config_lib import load; load('configs/ppo.py:tiny', []); "
            "assert 'jax' not in sys.modules, sorted(m for m in sys.modules if m.startswith('llm_jax'))")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_each_objective_writes_its_own_table_row():
    metrics = dict(eval_perplexity=12.345, eval_loss=2.5, eval_accuracy=0.9, eval_margin=1.2, gold_greedy=0.4,
                   gold_sampled=0.3, before_eval_gold_greedy=0.1, after_eval_gold_greedy=0.5, after_eval_kl=3.2)
    rows = {name: objectives.table_row_of(name)(metrics, {}) for name in objectives.OBJECTIVES}
    assert rows["lm"] == "held-out perplexity 12.35, loss 2.500"
    assert rows["sft"] == "answer-token eval loss 2.500; gold greedy 0.400, sampled 0.300"
    assert rows["reward"] == "held-out pair accuracy 0.900, margin 1.200"
    assert rows["dpo"] == "gold greedy 0.400, sampled 0.300; held-out pair accuracy 0.900"
    assert rows["rl"] == "gold greedy 0.100 → 0.500, sampled n/a → n/a; KL 3.200 nats"
    verifiable = dict(before_eval_reward_greedy=0.25, after_eval_reward_greedy=0.5, before_eval_reward=0.2,
                      after_eval_reward=0.45, after_eval_kl=1.5, before_eval_score=-7.0, after_eval_score=-5.0)
    assert objectives.table_row_of("rl")(verifiable, {}) == (
        "reward greedy 0.250 → 0.500, sampled 0.200 → 0.450; KL 1.500 nats; reward-model score -7.000 → -5.000")
    assert objectives.table_row_of("pairs") is None

    config = base_config()
    config.eval = dict(n_prompts=0, temperature=1.0, seed=0, max_new_tokens=32)
    records = {"sft": dict(kind="train", objective="sft", metrics=metrics, seconds=3.0),
               "import": dict(kind="import", metrics=dict(params=1234, gb_per_s=1.5), summary=dict(family="qwen3"),
                              seconds=2.0)}
    table = format_table(config, records, 5.0, [])
    assert f"| sft | 3 | {rows['sft']} |" in table
    assert "| import | 2 | qwen3 checkpoint, 1,234 params, 1.50 GB/s |" in table
