"""Jinja chat templates: rendered as transformers renders them, the loss mask derived from the rendering (and, on
the built-in chatml_min, equal to today's), the chat.py functions on them, errors, and parity with transformers on
the committed fixtures (tests/hf/fixtures/<family>/reference.json)."""
import json
import re

import numpy as np
import pytest
from test_hf_tokenizer import (FAMILIES, FIXTURES, QWEN_SPECIALS, byte_level_bpe, metaspace_bpe, reference,
                               write_dir)

from llm_jax.data import chat, default_corpus
from llm_jax.data.chat import (ExampleTooLong, check_template, render_conversation, render_pair, render_prompt,
                               render_response, stop_ids)
from llm_jax.data.chat_template import JinjaTemplate, TemplateError, derive_loss_targets
from llm_jax.data.hf_tokenizer import HFTokenizer
from llm_jax.data.records import Message
from llm_jax.data.sources import DataError
from llm_jax.data.tokenizer import train_tokenizer
from llm_jax.data.tokenizer_files import load_tokenizer

CONVERSATION = (Message("system", "Be brief."), Message("user", "What is 2+2?"), Message("assistant", "It is 4."),
                Message("user", "And 3+3?"), Message("assistant", "6, twice 3.\nDone."))
CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# Mistral v0.3's way: the system message goes in front of the LAST user message only, so an earlier turn renders
# differently once later turns follow (the prefix check fails and the derivation falls back).
MISTRAL = ("{% if messages[0].role == 'system' %}{% set system = messages[0].content %}"
           "{% set messages = messages[1:] %}{% endif %}{{ bos_token }}{% for m in messages %}"
           "{% if m.role == 'user' %}{% if loop.last and system is defined %}[INST] {{ system }}\n\n{{ m.content }}"
           "[/INST]{% else %}[INST] {{ m.content }}[/INST]{% endif %}"
           "{% elif m.role == 'assistant' %} {{ m.content | trim }}{{ eos_token }}"
           "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}")


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    tok = byte_level_bpe(QWEN_SPECIALS)
    ids = {s: tok.token_to_id(s) for s in QWEN_SPECIALS}
    return HFTokenizer.load(write_dir(
        tmp_path_factory.mktemp("qwen"), tok, {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"},
        generation={"eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]]}, template_file=CHATML))


@pytest.fixture(scope="module")
def mistral(tmp_path_factory):
    return HFTokenizer.load(write_dir(tmp_path_factory.mktemp("mistral"), metaspace_bpe(),
                                      {"bos_token": "<s>", "eos_token": "</s>", "chat_template": MISTRAL}))


@pytest.fixture(scope="module")
def sp(tmp_path_factory):
    docs = [t for t, _ in default_corpus.generate_documents(200)]
    return train_tokenizer(docs, str(tmp_path_factory.mktemp("chat") / "tokenizer.model"), vocab_size=512)


def learned_runs(tokens, mask):
    """The learned tokens (target i is tokens[i + 1]) as runs of consecutive positions."""
    runs, last = [], None
    for i in np.flatnonzero(mask) + 1:
        if last is None or i != last + 1:
            runs.append([])
        runs[-1].append(int(tokens[i]))
        last = i
    return runs


def test_rendering_follows_transformers_environment():
    source = ("{%- for m in messages %}\n    {{- m.role }}:{{ m.content | tojson }}\n"
              "{%- if loop.index == 2 %}{% break %}{% endif %}\n{%- endfor %}\n"
              "{% generation %}[{{ bos_token }}|{{ add_generation_prompt }}|{{ tools }}]{% endgeneration %}\n"
              "{{ strftime_now('%Y') | length }}")
    messages = [Message("user", "é <b>&"), {"role": "assistant", "content": "x"}, Message("user", "never")]
    text = JinjaTemplate(source, "t.jinja").render(messages, add_generation_prompt=True, bos_token="<s>")
    # tojson keeps non-ASCII and HTML characters; trim_blocks eats the newline after a block; loop controls work
    assert text == 'user:"é <b>&"assistant:"x"[<s>|True|None]4'
    assert JinjaTemplate("{{ x }}", "t", {"x": 1}).render([], x=2) == "2"  # render kwargs over the template's


def test_template_errors_name_the_file_and_the_jinja_message(qwen, tmp_path):
    with pytest.raises(TemplateError, match=r"chat template bad.jinja does not compile: .*'endfor'.* \(line 1\)"):
        JinjaTemplate("{% for m in messages %}{{ m }}", "bad.jinja")
    path = tmp_path / "alternate.jinja"
    path.write_text(CHATML.replace("{% for m in messages %}", "{% for m in messages %}{% if loop.index0 == 2 %}"
                                   "{{ raise_exception('roles must alternate') }}{% endif %}"))
    with pytest.raises(DataError, match=f"data.jsonl:3: chat template {path}: roles must alternate"):
        render_conversation(CONVERSATION, qwen, str(path), where="data.jsonl:3")
    with pytest.raises(TemplateError, match="chat template t.jinja: TypeError: can only concatenate str"):
        JinjaTemplate("{{ 'a' + 1 }}", "t.jinja").render([])
    with pytest.raises(FileNotFoundError, match="chat template 'missing.jinja' cannot be read"):
        chat.get_template("missing.jinja")
    upper = tmp_path / "upper.jinja"
    upper.write_text(CHATML.replace("{{ m.content }}", "{{ m.content | upper }}"))
    with pytest.raises(TemplateError, match=f"a probe conversation: chat template {upper}: the content of message 1 "
                                            f"\\(assistant\\) is not in its rendering"):
        stop_ids(qwen, str(upper))
    spelled = tmp_path / "spelled.jinja"
    spelled.write_text(CHATML.replace("{{ m.content }}", "{{ m.content | replace('4', 'four') }}"))
    with pytest.raises(DataError, match=f"ex:1: chat template {spelled}: the content of message 2 \\(assistant\\) "
                                        f"is not in its rendering"):
        render_conversation(CONVERSATION, qwen, str(spelled), where="ex:1")


def chatml_min_as_text(tok):
    """chatml_min written as a text template plus a tokenizer that encodes each text between its symbols on its
    own (as chat.py does): the generic derivation works from these two functions alone."""
    symbols = {s: tok.special_id(s) for s in ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")}

    def render_text(messages, add_generation_prompt):
        return "".join(f"<|{m.role}|>{m.content}<|end|>" for m in messages) + (
            "<|assistant|>" if add_generation_prompt else "")

    def tokenize(text):
        ids, offsets, at = [tok.bos_id], [(0, 0)], 0
        for piece in re.split("(" + "|".join(map(re.escape, symbols)) + ")", text):
            piece_ids, piece_offsets = ([symbols[piece]], [(0, len(piece))]) if piece in symbols else \
                tok.encode_with_offsets(piece)
            ids += piece_ids
            offsets += [(at + s, at + e) for s, e in piece_offsets]
            at += len(piece)
        return ids + [tok.eos_id], offsets + [(at, at)]
    return render_text, tokenize


def test_derivation_on_chatml_min_gives_todays_masks(sp):
    render_text, tokenize = chatml_min_as_text(sp)
    for messages in (CONVERSATION, CONVERSATION[1:3], (Message("user", "Hi"), Message("assistant", "")),
                     (Message("user", "It is 4."), Message("assistant", "It is 4."))):  # content also in the prompt
        want_tokens, want_mask = render_conversation(messages, sp)
        ids, learned = derive_loss_targets(messages, render_text, tokenize, stop_ids(sp))
        assert ids == want_tokens.tolist() and learned[1:].tolist() == want_mask.tolist()


def test_jinja_conversation_prompt_response_and_stops(qwen, tmp_path):
    im_end, endoftext = qwen.special_id("<|im_end|>"), qwen.special_id("<|endoftext|>")
    tokens, mask = render_conversation(CONVERSATION, qwen, "hf")
    text = JinjaTemplate(CHATML, "t").render(CONVERSATION)
    assert tokens.tolist() == qwen.encode(text) and len(mask) == len(tokens) - 1 and mask.dtype == np.float32
    assert [qwen.decode(run) for run in learned_runs(tokens, mask)] == ["It is 4.<|im_end|>",
                                                                       "6, twice 3.\nDone.<|im_end|>"]
    prompt = render_prompt(CONVERSATION[:-1], qwen, "hf")
    response = render_response(CONVERSATION[-1].content, qwen, "hf")
    assert qwen.decode(prompt).endswith("<|im_start|>assistant\n") and qwen.bos_id is None  # no bos added
    assert tokens.tolist() == [*prompt, *response, *qwen.encode("\n")]
    assert response[-1] == im_end and stop_ids(qwen, "hf") == (im_end, endoftext)
    assert check_template(qwen, "hf") == {"<|im_end|>": im_end}
    # The same template from a .jinja file path gives the same tokens.
    path = tmp_path / "chatml.jinja"
    path.write_text(CHATML)
    assert render_conversation(CONVERSATION, qwen, str(path))[0].tolist() == tokens.tolist()


def test_jinja_pair_scores_only_the_final_answer(qwen):
    prompt = CONVERSATION[:4]
    pair = render_pair(prompt, "Six.", "Seven, surely.", qwen, "hf")
    assert pair.prompt.tolist() == render_prompt(prompt, qwen, "hf").tolist()
    assert pair.response_start == len(pair.prompt)
    for seq, mask, answer in ((pair.chosen, pair.chosen_mask, "Six."),
                              (pair.rejected, pair.rejected_mask, "Seven, surely.")):
        assert seq.tolist() == render_conversation((*prompt, Message("assistant", answer)), qwen, "hf")[0].tolist()
        assert seq[:pair.response_start].tolist() == pair.prompt.tolist()
        assert [qwen.decode(run) for run in learned_runs(seq, mask)] == [f"{answer}<|im_end|>"]


def test_jinja_truncation_drops_whole_early_exchanges(qwen):
    full, _ = render_conversation(CONVERSATION, qwen, "hf")
    short = (CONVERSATION[0], *CONVERSATION[3:])
    kept, kept_mask = render_conversation(short, qwen, "hf")
    tokens, mask = render_conversation(CONVERSATION, qwen, "hf", max_len=len(full) - 1)
    assert tokens.tolist() == kept.tolist() and mask.tolist() == kept_mask.tolist()
    with pytest.raises(ExampleTooLong, match=rf"data.jsonl:7: {len(kept)} tokens with only the last exchange kept, "
                                             rf"more than max_len={len(kept) - 1}"):
        render_conversation(CONVERSATION, qwen, "hf", max_len=len(kept) - 1, where="data.jsonl:7")
    prompt = render_prompt(CONVERSATION[:4], qwen, "hf", max_len=len(render_prompt(short[:2], qwen, "hf")))
    assert prompt.tolist() == render_prompt(short[:2], qwen, "hf").tolist()
    pair = render_pair(CONVERSATION[:4], CONVERSATION[4].content, "No.", qwen, "hf", max_len=len(kept))
    assert pair.chosen.tolist() == kept.tolist()
    with pytest.raises(ExampleTooLong, match="pair"):
        render_pair(CONVERSATION[:4], CONVERSATION[4].content, "No.", qwen, "hf", max_len=len(kept) - 1)


def test_jinja_data_errors(qwen, sp):
    with pytest.raises(DataError, match=r"ex:3: message 1 \(user\) contains the reserved chat symbol '<\|im_end\|>'"):
        render_conversation([Message("system", "s"), Message("user", "a <|im_end|> b"), Message("assistant", "c")],
                            qwen, "hf", where="ex:3")
    with pytest.raises(DataError, match="a prompt must end with role 'user', got 'assistant'"):
        render_prompt(CONVERSATION[:3], qwen, "hf")
    with pytest.raises(ValueError, match=f"tokenizer {sp.path} has no chat template, which data.chat_template='hf'"):
        render_prompt(CONVERSATION[:2], sp, "hf")


def test_a_template_that_moves_the_system_message(mistral):
    """Mistral's template renders earlier turns differently once later ones follow: the masks still hold exactly
    each answer and its </s>."""
    tokens, mask = render_conversation(CONVERSATION, mistral, "hf")
    assert mistral.decode(tokens) == ("<s>[INST] What is 2+2?[/INST] It is 4.</s>[INST] And 3+3?[/INST] "
                                      "6, twice 3.\nDone.</s>")  # the system message went with the last user turn
    runs = learned_runs(tokens, mask)
    assert [mistral.decode(run) for run in runs] == ["It is 4.</s>", "6, twice 3.\nDone.</s>"]
    assert stop_ids(mistral, "hf") == (mistral.eos_id,) and render_response("Hi there", mistral, "hf")[-1] == 2
    with pytest.raises(DataError, match="ex:2: chat template .*Only user and assistant roles are supported!"):
        render_prompt([Message("tool", "x"), Message("user", "y")], mistral, "hf", where="ex:2")


def test_a_template_that_trims_content(qwen, tmp_path):
    path = tmp_path / "trim.jinja"
    path.write_text(CHATML.replace("{{ m.content }}", "{{ m.content | trim }}"))
    messages = (Message("user", "Hi"), Message("assistant", "  Paris.  "))
    tokens, mask = render_conversation(messages, qwen, str(path))
    assert [qwen.decode(run) for run in learned_runs(tokens, mask)] == ["Paris.<|im_end|>"]


# ---- parity with transformers on the committed fixtures ------------------------------------------------------

END_OF_TURN = {"llama": "<|eot_id|>", "mistral": "</s>", "qwen2": "<|im_end|>", "qwen3": "<|im_end|>",
               "gemma3": "<end_of_turn>"}


@pytest.mark.parametrize("family", FAMILIES)
def test_chat_renderings_and_masks_match_transformers(family):
    ref = reference(family)
    tok = load_tokenizer(str(FIXTURES / family))
    template = JinjaTemplate(tok.chat_template, tok.chat_template_origin)
    end = tok.special_id(END_OF_TURN[family])
    stops = stop_ids(tok, "hf")
    assert stops[0] == end and set(ref["generation_eos_token_ids"]) <= set(stops)
    for conv in ref["conversations"]:
        messages = [Message(m["role"], m["content"]) for m in conv["messages"]]
        assert template.render(messages, **tok.special_tokens) == conv["text"]
        assert template.render(messages[:-1], True, **tok.special_tokens) == conv["prompt_text"]
        tokens, mask = render_conversation(messages, tok, "hf")
        assert tokens.tolist() == conv["ids"]
        assert render_prompt(messages[:-1], tok, "hf").tolist() == conv["prompt_ids"]
        # learned: exactly each answer and the end-of-turn token after it
        answers = [m.content for m in messages if m.role == "assistant"]
        runs = learned_runs(tokens, mask)
        assert [tok.decode(run).lstrip(" ") for run in runs] == [a + END_OF_TURN[family] for a in answers]
        assert [run[-1] for run in runs] == [end] * len(answers)
        assert render_response(answers[-1], tok, "hf").tolist() == runs[-1]
        if "prompt_ids_no_thinking" in conv:
            no_thinking = JinjaTemplate(tok.chat_template, tok.chat_template_origin, {"enable_thinking": False})
            assert render_prompt(messages[:-1], tok, no_thinking).tolist() == conv["prompt_ids_no_thinking"]
            tokens, mask = render_conversation(messages, tok, no_thinking)
            assert [tok.decode(run) for run in learned_runs(tokens, mask)] == [a + "<|im_end|>" for a in answers]


def test_fixture_keys_are_what_these_tests_read():
    path = next(iter(sorted(FIXTURES.glob("*/reference.json"))), None)
    if path is None:
        pytest.skip(f"no {FIXTURES}/*/reference.json yet")
    ref = json.loads(path.read_text(encoding="utf-8"))
    assert {"messages", "text", "ids", "prompt_text", "prompt_ids"} <= set(ref["conversations"][0])


def test_sft_and_preference_data_on_an_hf_tokenizer(qwen, tmp_path):
    """post_training builds SFT rows and preference rows with data.chat_template="hf" unchanged: the loss falls on
    the answers and their <|im_end|> only."""
    import ml_collections
    from llm_jax.data import post_training, preference_rows
    sft, prefs = tmp_path / "sft.jsonl", tmp_path / "prefs.jsonl"
    sft.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Question {i}?"},
                                                    {"role": "assistant", "content": f"Answer {i}."}]}) + "\n"
                           for i in range(8)))
    prefs.write_text("".join(json.dumps({"prompt": f"Question {i}?", "chosen": f"Yes {i}.", "rejected": "No."}) + "\n"
                             for i in range(8)))
    config = ml_collections.ConfigDict({"seed": 0, "data": {
        "train": str(sft), "eval": str(sft), "format": "auto", "eval_fraction": 0.0, "seq_len": 64,
        "batch_size": 2, "chat_template": "hf"}})
    data = post_training.build_sft_data(config, qwen, str(tmp_path))
    assert data.stats["n_train_examples"] == 8 and data.stats["n_train_too_long"] == 0
    config.data.train = config.data.eval = str(prefs)
    train, _, stats = preference_rows.render_preferences(config, qwen, str(tmp_path))
    assert stats["n_train_pairs"] == 8
    row = 0
    targets = train["chosen_targets"][row][train["chosen_loss_mask"][row] > 0]
    assert qwen.decode(targets) in {f"Yes {i}.<|im_end|>" for i in range(8)}
