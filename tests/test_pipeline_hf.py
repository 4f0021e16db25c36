"""The post-training chain from a Hugging Face checkpoint (configs/pipeline.py:hf_small) on a tiny fixture: import,
SFT with LoRA on a user's chats in the checkpoint's own template, pairs, reward model and PPO from the merged SFT
weights, DPO with LoRA on the user's pairs; then the DPO model exports (adapters merged) and imports again."""
import json
import os

import pytest

from llm_jax import cli, config_lib, runs
from llm_jax.data import chat
from llm_jax.data.records import Message

GEMMA = os.path.join(os.path.dirname(__file__), "hf", "fixtures", "gemma3")


@pytest.mark.slow
def test_the_hf_pipeline_post_trains_an_imported_checkpoint(tmp_path, capsys):
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"What is {i} plus {i}?"},
        {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]}) + "\n" for i in range(240)))
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"What is {i} times two?", "chosen": f"{2 * i}.",
                                         "rejected": f"{2 * i + 1}."}) + "\n" for i in range(60)))
    workdir = str(tmp_path / "p")
    args = ["pipeline", "--config", "configs/pipeline.py:hf_small", "--workdir", workdir, f"--config.base={GEMMA}",
            f"--config.chats={chats}",
            "--config.stages.sft.extra=model.lora_rank=4 model.lora_targets=wq,wv,w_up optim.lr=1e-3",
            f"--config.stages.dpo.extra=data.train={pairs} data.eval_fraction=0.2 model.lora_rank=4"]
    assert cli.main(args) == 0
    table = capsys.readouterr().out
    for stage in ("base", "sft", "pairs", "reward", "ppo", "grpo", "dpo", "arena"):
        assert f"| {stage} |" in table
        assert os.path.isfile(os.path.join(workdir, stage, "stage.json"))
    assert "gemma3 checkpoint, 181,248 params" in table

    sft = runs.load_run(os.path.join(workdir, "sft"))
    assert sft.model_cfg.family == "gemma3" and sft.model_cfg.param_dtype == "float32"
    assert sft.model_cfg.lora_rank == 4
    assert sft.config.data.chat_template == "hf" and sft.config.data.train == str(chats)
    # the chats were rendered in Gemma's own template: its turn markers, the loss on the answer and its end
    tokens, mask = chat.render_conversation(
        [Message("user", "What is 1 plus 1?"), Message("assistant", "1 plus 1 is 2.")], sft.tokenizer, "hf")
    learned = sft.tokenizer.decode([int(t) for t, m in zip(tokens[1:], mask) if m])
    assert learned == "1 plus 1 is 2.<end_of_turn>"
    assert "<start_of_turn>model\n" in sft.tokenizer.decode(tokens)

    # a rerun skips every stage; the DPO model exports and re-imports unchanged
    assert cli.main(args) == 0
    captured = capsys.readouterr()
    assert captured.out == table and captured.err.count(", skipped") == 8
    assert cli.main(["export-hf", "--run", os.path.join(workdir, "dpo"), "--out", str(tmp_path / "out")]) == 0
    assert cli.main(["import-hf", "--hf", str(tmp_path / "out"), "--workdir", str(tmp_path / "again")]) == 0
    assert config_lib.load("configs/pipeline.py:hf", []).order == ("base", "sft", "pairs", "reward", "ppo", "grpo",
                                                                         "dpo", "arena")
