"""Assistant-only loss masks per family, token by token, as the data pipeline builds them.

A multi-turn conversation (system, user, assistant, user, assistant) goes through
`still.formats.Encoder` on each family's real chat format. Exactly each assistant turn's
content and the family's end-of-turn token carry loss: no role header, no template whitespace,
no Qwen3 <think></think> scaffolding, no Phi-3 eos after the last <|end|>, no Mistral [INST].
"""

import pytest
from families import FAMILIES, FAMILY

from still.formats import Encoder, special_token_ids
from still.losses import IGNORE_INDEX

SYSTEM = "Answer in one short sentence."
CONVERSATION = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": "What does abs do?"},
    {"role": "assistant", "content": "Return the absolute value of a number."},
    {"role": "user", "content": "And len?"},
    {"role": "assistant", "content": "Return the number of items."},
]
ANSWERS = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]


def trained_runs(input_ids, labels) -> list[list[int]]:
    """The maximal runs of loss-carrying positions, as token ids."""
    runs, current = [], []
    for token, label in zip(input_ids, labels, strict=True):
        if label != IGNORE_INDEX:
            assert label == token  # a label is the token at its own position, never another
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


@pytest.mark.parametrize("name", FAMILIES)
def test_each_assistant_turn_and_its_end_of_turn_token_carry_loss_and_nothing_else(
    family_tokenizer, name
):
    tokenizer, family = family_tokenizer(name), FAMILY[name]
    encoded = Encoder(tokenizer).encode({"messages": CONVERSATION})
    text = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert encoded.input_ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    runs = trained_runs(encoded.input_ids, encoded.labels)
    decoded = [tokenizer.decode(run, skip_special_tokens=False) for run in runs]
    assert decoded == [answer + family.end_of_turn for answer in ANSWERS]
    # token by token: each run is the content's own tokens, then the one end-of-turn token
    end_of_turn = tokenizer.convert_tokens_to_ids(family.end_of_turn)
    for run, answer in zip(runs, ANSWERS):
        assert run[-1] == end_of_turn
        assert tokenizer.decode(run[:-1]) == answer and end_of_turn not in run[:-1]
    trained = [i for i, label in enumerate(encoded.labels) if label != IGNORE_INDEX]
    assert sum(len(run) for run in runs) == len(trained)
    assert encoded.end_of_turn == trained[-1]  # what the data stats count as "eos trained"


@pytest.mark.parametrize("name", FAMILIES)
def test_last_assistant_trains_only_the_final_turn(family_tokenizer, name):
    tokenizer, family = family_tokenizer(name), FAMILY[name]
    encoded = Encoder(tokenizer, train_on="last_assistant").encode({"messages": CONVERSATION})
    runs = trained_runs(encoded.input_ids, encoded.labels)
    assert [tokenizer.decode(run) for run in runs] == [ANSWERS[-1] + family.end_of_turn]


@pytest.mark.parametrize("name", FAMILIES)
def test_a_single_turn_trains_the_answer_only(family_tokenizer, name):
    """One turn is where a prefix-stable template put its scaffolding into the turn: Qwen3's
    empty reasoning block before the answer, Phi-3's eos after the <|end|>."""
    tokenizer, family = family_tokenizer(name), FAMILY[name]
    encoded = Encoder(tokenizer).encode({"messages": CONVERSATION[1:3]})
    runs = trained_runs(encoded.input_ids, encoded.labels)
    assert [tokenizer.decode(run) for run in runs] == [ANSWERS[0] + family.end_of_turn]
    specials = special_token_ids(tokenizer)
    trained_specials = {
        token
        for token, label in zip(encoded.input_ids, encoded.labels)
        if label != IGNORE_INDEX and token in specials
    }
    assert tokenizer.convert_ids_to_tokens(sorted(trained_specials)) == [family.end_of_turn]


@pytest.mark.parametrize("name, answer", [("qwen3", "think"), ("phi3", "end"), ("llama3", "user")])
def test_an_answer_spelled_like_a_template_token_is_found_as_itself(family_tokenizer, name, answer):
    """'think' is also inside Qwen3's <think>, 'end' inside Phi-3's <|end|>: the answer's own
    tokens carry the loss, not the special token whose text contains it."""
    tokenizer, family = family_tokenizer(name), FAMILY[name]
    messages = [{"role": "user", "content": "One word?"}, {"role": "assistant", "content": answer}]
    for conversation in (messages, messages + [*CONVERSATION[3:4], *messages[1:]]):
        encoded = Encoder(tokenizer).encode({"messages": conversation})
        runs = trained_runs(encoded.input_ids, encoded.labels)
        assert {tokenizer.decode(run) for run in runs} == {answer + family.end_of_turn}
