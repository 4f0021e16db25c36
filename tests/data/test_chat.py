"""Chat template: exact tokens and loss masks, prompt/response/pair consistency, truncation and errors."""
import numpy as np
import pytest

from llm_jax.data import chat, default_corpus
from llm_jax.data.chat import (ChatTemplate, ExampleTooLong, check_template, render_conversation, render_pair,
                               render_prompt, render_response, stop_ids)
from llm_jax.data.records import Message
from llm_jax.data.sources import DataError
from llm_jax.data.tokenizer import train_tokenizer

SYSTEM, USER_1, ANSWER_1 = "Be brief.", "What is 2+2?", "It is 4."
USER_2, ANSWER_2 = "And 3+3?", "6, twice 3.\nDone."
CONVERSATION = (Message("system", SYSTEM), Message("user", USER_1), Message("assistant", ANSWER_1),
                Message("user", USER_2), Message("assistant", ANSWER_2))


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    docs = [t for t, _ in default_corpus.generate_documents(200)]
    return train_tokenizer(docs, str(tmp_path_factory.mktemp("chat") / "tokenizer.model"), vocab_size=512)


def ids(tok):
    return {name: tok.special_id(f"<|{name}|>") for name in ("system", "user", "assistant", "end")}


def test_multi_turn_tokens_and_loss_mask(tok):
    s = ids(tok)
    enc = tok.encode
    want = ([tok.bos_id, s["system"], *enc(SYSTEM), s["end"],
             s["user"], *enc(USER_1), s["end"], s["assistant"], *enc(ANSWER_1), s["end"],
             s["user"], *enc(USER_2), s["end"], s["assistant"], *enc(ANSWER_2), s["end"], tok.eos_id])
    tokens, mask = render_conversation(CONVERSATION, tok)
    assert tokens.dtype == np.int32 and mask.dtype == np.float32
    assert tokens.tolist() == want and len(mask) == len(tokens) - 1
    # Learned targets: exactly each answer's content and the <|end|> after it, nothing of system or user turns.
    answer_1_at = 1 + (len(enc(SYSTEM)) + 2) + (len(enc(USER_1)) + 2) + 1
    answer_2_at = answer_1_at + len(enc(ANSWER_1)) + 1 + (len(enc(USER_2)) + 2) + 1
    learned = [*range(answer_1_at, answer_1_at + len(enc(ANSWER_1)) + 1),
               *range(answer_2_at, answer_2_at + len(enc(ANSWER_2)) + 1)]
    assert (np.flatnonzero(mask) + 1).tolist() == learned  # target i is tokens[i + 1]
    assert [tokens[i] for i in learned] == [*enc(ANSWER_1), s["end"], *enc(ANSWER_2), s["end"]]


def test_decode_round_trips_every_part(tok):
    tokens, _ = render_conversation(CONVERSATION, tok)
    bounds = np.flatnonzero(np.isin(tokens, list(ids(tok).values())))
    parts = [tok.decode(tokens[a + 1:b]) for a, b in zip(bounds[:-1], bounds[1:]) if b > a + 1]
    assert parts == [SYSTEM, USER_1, ANSWER_1, USER_2, ANSWER_2]
    # Each content starts a new word for sentencepiece, hence the space after every marker.
    assert tok.decode(tokens) == (f"<|system|> {SYSTEM}<|end|><|user|> {USER_1}<|end|><|assistant|> {ANSWER_1}"
                                  f"<|end|><|user|> {USER_2}<|end|><|assistant|> {ANSWER_2}<|end|>")


def test_prompt_and_response_compose_the_conversation(tok):
    tokens, _ = render_conversation(CONVERSATION, tok)
    prompt = render_prompt(CONVERSATION[:-1], tok)
    response = render_response(ANSWER_2, tok)
    assert prompt[-1] == ids(tok)["assistant"]
    assert tokens.tolist() == [*prompt, *response, tok.eos_id]
    assert response[-1] in stop_ids(tok) and stop_ids(tok) == (ids(tok)["end"], tok.eos_id)
    assert tok.decode(response[:-1]) == ANSWER_2
    # The prompt of an earlier turn is a prefix too: generation sees what training saw.
    first_prompt = render_prompt(CONVERSATION[:2], tok)
    assert tokens[:len(first_prompt)].tolist() == first_prompt.tolist()


def test_pair_is_the_conversation_of_each_answer(tok):
    prompt = CONVERSATION[:4]
    pair = render_pair(prompt, "Six.", "Seven, surely.", tok)
    assert pair.prompt.tolist() == render_prompt(prompt, tok).tolist() and pair.response_start == len(pair.prompt)
    for seq, mask, text in ((pair.chosen, pair.chosen_mask, "Six."), (pair.rejected, pair.rejected_mask,
                                                                        "Seven, surely.")):
        tokens, _ = render_conversation((*prompt, Message("assistant", text)), tok)
        assert seq.tolist() == tokens.tolist()
        # Only the final answer is scored, earlier assistant turns of the prompt are not.
        assert (np.flatnonzero(mask) + 1).tolist() == list(range(pair.response_start, len(seq) - 1))
        assert tok.decode(seq[pair.response_start:-2]) == text


def test_truncation_drops_whole_early_exchanges(tok):
    full, _ = render_conversation(CONVERSATION, tok)
    short = (CONVERSATION[0], *CONVERSATION[3:])
    kept, kept_mask = render_conversation(short, tok)
    assert render_conversation(CONVERSATION, tok, max_len=len(full))[0].tolist() == full.tolist()
    tokens, mask = render_conversation(CONVERSATION, tok, max_len=len(full) - 1)
    assert tokens.tolist() == kept.tolist() and mask.tolist() == kept_mask.tolist()
    with pytest.raises(ExampleTooLong, match=rf"data.jsonl:7: {len(kept)} tokens with only the last exchange "
                                             rf"kept, more than max_len={len(kept) - 1}"):
        render_conversation(CONVERSATION, tok, max_len=len(kept) - 1, where="data.jsonl:7")
    prompt = render_prompt(CONVERSATION[:4], tok, max_len=len(kept) - len(render_response(ANSWER_2, tok)) - 1)
    assert prompt.tolist() == render_prompt(short[:2], tok).tolist()
    pair = render_pair(CONVERSATION[:4], ANSWER_2, "No.", tok, max_len=len(kept))
    assert pair.chosen.tolist() == kept.tolist()
    with pytest.raises(ExampleTooLong, match="pair"):
        render_pair(CONVERSATION[:4], ANSWER_2, "No.", tok, max_len=len(kept) - 1)


def test_errors_name_the_problem(tok):
    with pytest.raises(DataError, match="ex:3: message 0 \\(user\\) contains the reserved chat symbol '<\\|end\\|>'"):
        render_conversation([Message("user", "a <|end|> b"), Message("assistant", "c")], tok, where="ex:3")
    with pytest.raises(DataError, match="a conversation must end with role 'assistant', got 'user'"):
        render_conversation(CONVERSATION[:2], tok)
    with pytest.raises(DataError, match="a prompt must end with role 'user', got 'assistant'"):
        render_prompt(CONVERSATION[:3], tok)
    with pytest.raises(ValueError, match="unknown chat template 'chatml'; expected one of \\['chatml_min'\\]"):
        render_prompt(CONVERSATION[:2], tok, template="chatml")
    assert set(check_template(tok)) == {"<|system|>", "<|user|>", "<|assistant|>", "<|end|>"}
    tool = ChatTemplate("tool", {**chat.TEMPLATES["chatml_min"].markers, "tool": ("<|tool|>",)}, "<|end|>")
    with pytest.raises(ValueError, match=f"tokenizer {tok.path} has no special symbol '<\\|tool\\|>', which "
                                         f"chat template 'tool' needs"):
        check_template(tok, tool)
