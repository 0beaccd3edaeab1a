"""still.data + still.formats: sources, formats, exact loss masks, bad rows, truncation, cache."""

import copy
import json
import os

import pytest
from tiny_models import CHATML_TEMPLATE

from still import data as still_data
from still import formats
from still.errors import StillError
from still.formats import IGNORE_INDEX
from still.rows import strict_rows
from still.sections import DataSection

SYSTEM = "Answer in one line."
Q1, A1 = "What does json.dumps do?", "Serialize obj to a JSON formatted str."
Q2, A2 = "What does os.path.join do?", "Join two or more pathname components."
EOT = "<|im_end|>"


def write_jsonl(path, rows):
    path.write_text(
        "".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows)
    )
    return path


def section(path, **settings) -> DataSection:
    train = {"path": str(path)}
    for key in ("format", "prompt", "response", "input", "system", "text", "messages", "limit"):
        if key in settings:
            train[key] = settings.pop(key)
    return DataSection(train=train, **settings)


def prep(data, tokenizer, tmp_path, **kwargs):
    return still_data.prepare(
        data, tokenizer, cache_dir=tmp_path / "cache", progress=False, **kwargs
    )


def loss_spans(tokenizer, input_ids, labels) -> list[str]:
    """Decoded runs of loss-carrying tokens, in order."""
    spans, run = [], []
    for token_id, label in zip(input_ids, labels):
        if label != IGNORE_INDEX:
            assert label == token_id
            run.append(token_id)
        elif run:
            spans.append(tokenizer.decode(run))
            run = []
    if run:
        spans.append(tokenizer.decode(run))
    return spans


def after_each_span(input_ids, labels) -> list[tuple[int, int]]:
    """(token id, label) of the token right after each loss run."""
    return [
        (input_ids[i + 1], labels[i + 1])
        for i in range(len(labels) - 1)
        if labels[i] != IGNORE_INDEX and labels[i + 1] == IGNORE_INDEX
    ]


def chat_row(*turns, system=None):
    messages = [{"role": "system", "content": system}] if system else []
    for number, text in enumerate(turns):
        messages.append({"role": "user" if number % 2 == 0 else "assistant", "content": text})
    return {"messages": messages}


def first(prepared):
    row = prepared.dataset[0]
    return row["input_ids"], row["labels"]


# --------------------------------------------------------------------------- loss masks
def test_chat_single_turn_trains_exactly_the_answer_and_im_end(tiny_tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [chat_row(Q1, A1)])
    prepared = prep(section(path), tiny_tokenizer, tmp_path)
    ids, labels = first(prepared)
    assert loss_spans(tiny_tokenizer, ids, labels) == [A1 + EOT]
    newline = tiny_tokenizer.convert_tokens_to_ids("Ċ")
    assert after_each_span(ids, labels) == [(newline, IGNORE_INDEX)]
    assert ids[-1] == newline and labels[-1] == IGNORE_INDEX  # the template's trailing "\n"
    assert prepared.stats.eos_trained
    assert prepared.stats.loss_tokens == sum(label != IGNORE_INDEX for label in labels)


@pytest.mark.parametrize(
    "train_on, expected",
    [("assistant", [A1 + EOT, A2 + EOT]), ("last_assistant", [A2 + EOT])],
)
def test_chat_multi_turn_with_system(tiny_tokenizer, tmp_path, train_on, expected):
    path = write_jsonl(tmp_path / "train.jsonl", [chat_row(Q1, A1, Q2, A2, system=SYSTEM)])
    ids, labels = first(prep(section(path, train_on=train_on), tiny_tokenizer, tmp_path))
    assert loss_spans(tiny_tokenizer, ids, labels) == expected
    assert all(label == IGNORE_INDEX for _, label in after_each_span(ids, labels))
    assert tiny_tokenizer.decode(ids).startswith(f"<|im_start|>system\n{SYSTEM}{EOT}\n")


def test_train_on_all_trains_every_token(tiny_tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [chat_row(Q1, A1, Q2, A2, system=SYSTEM)])
    ids, labels = first(prep(section(path, train_on="all"), tiny_tokenizer, tmp_path))
    assert labels == ids


def test_instruction_without_and_with_alpaca_input(tiny_tokenizer, tmp_path):
    rows = [
        {"instruction": Q1, "input": "", "output": A1},
        {"instruction": Q2, "input": "a, b", "output": A2},
    ]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    data = section(
        path, format="instruction", prompt="instruction", input="input", response="output"
    )
    prepared = prep(data, tiny_tokenizer, tmp_path)
    texts = [tiny_tokenizer.decode(row["input_ids"]) for row in prepared.dataset]
    assert texts[0] == f"<|im_start|>user\n{Q1}{EOT}\n<|im_start|>assistant\n{A1}{EOT}\n"
    assert f"<|im_start|>user\n{Q2}\n\na, b{EOT}\n" in texts[1]
    for row, answer in zip(prepared.dataset, (A1, A2)):
        assert loss_spans(tiny_tokenizer, row["input_ids"], row["labels"]) == [answer + EOT]


def test_instruction_system_field_and_system_prompt(tiny_tokenizer, tmp_path):
    rows = [{"q": Q1, "a": A1, "sys": "Row system."}, {"q": Q2, "a": A2}]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    data = section(
        path, format="instruction", prompt="q", response="a", system="sys", system_prompt=SYSTEM
    )
    texts = [
        tiny_tokenizer.decode(row["input_ids"])
        for row in prep(data, tiny_tokenizer, tmp_path).dataset
    ]
    assert texts[0].startswith(f"<|im_start|>system\nRow system.{EOT}")
    assert texts[1].startswith(f"<|im_start|>system\n{SYSTEM}{EOT}")


def test_completion_adds_bos_and_trains_eos(tiny_tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [{"text": A1}])
    prepared = prep(section(path, format="completion"), tiny_tokenizer, tmp_path)
    ids, labels = first(prepared)
    assert ids[0] == tiny_tokenizer.bos_token_id and ids[-1] == tiny_tokenizer.eos_token_id
    assert labels == ids
    assert tiny_tokenizer.decode(ids[1:-1]) == A1
    assert prepared.stats.eos_trained


def test_eos_trained_when_pad_is_eos(tiny_tokenizer, tmp_path):
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.pad_token = tokenizer.eos_token  # SmolLM2: pad == eos == <|im_end|>
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    path = write_jsonl(tmp_path / "train.jsonl", [chat_row(Q1, A1), chat_row(Q2, A2 + " ok")])
    prepared = prep(section(path), tokenizer, tmp_path)
    assert prepared.stats.eos_trained
    batch = still_data.PaddedCollator(tokenizer.pad_token_id)(list(prepared.dataset))
    for ids, labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist()):
        trained = [token for token, label in zip(ids, labels) if label != IGNORE_INDEX]
        assert trained[-1] == tokenizer.eos_token_id
        assert loss_spans(tokenizer, ids, labels)[-1].endswith(EOT)


def test_not_prefix_stable_template_falls_back_to_offsets(tiny_tokenizer):
    # Marks the end of the conversation, so messages[:i+1] is not a prefix of the full render.
    template = CHATML_TEMPLATE + "{% if not add_generation_prompt %}<|endoftext|>{% endif %}"
    encoder = formats.Encoder(tiny_tokenizer, "assistant", template)
    messages = chat_row(Q1, A1, Q2, A2, system=SYSTEM)["messages"]
    encoded = encoder.encode({"messages": messages})
    assert encoder._spans_by_prefix(messages, encoded.input_ids) is None
    assert loss_spans(tiny_tokenizer, encoded.input_ids, encoded.labels) == [A1 + EOT, A2 + EOT]
    assert encoded.input_ids[encoded.end_of_turn] == tiny_tokenizer.eos_token_id
    chatml = formats.Encoder(tiny_tokenizer, "assistant").encode({"messages": messages})
    assert encoded.labels[: len(chatml.labels)] == chatml.labels


def test_recipe_chat_template_replaces_the_tokenizers(tiny_tokenizer, tmp_path):
    template = (
        "{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}<|im_end|>"
        "{% endfor %}{% if add_generation_prompt %}### assistant: {% endif %}"
    )
    path = write_jsonl(tmp_path / "train.jsonl", [chat_row(Q1, A1)])
    ids, labels = first(prep(section(path, chat_template=template), tiny_tokenizer, tmp_path))
    assert tiny_tokenizer.decode(ids).startswith(f"### user: {Q1}")
    assert loss_spans(tiny_tokenizer, ids, labels) == [A1 + EOT]


def test_no_chat_template_is_one_line_error(tiny_tokenizer, tmp_path):
    tiny_tokenizer.chat_template = None
    path = write_jsonl(tmp_path / "train.jsonl", [chat_row(Q1, A1)])
    with pytest.raises(StillError, match="data.chat_template.*format: completion"):
        prep(section(path), tiny_tokenizer, tmp_path)


def test_render_loss_mask_marks_trained_spans(tiny_tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [chat_row(Q1, A1)])
    ids, labels = first(prep(section(path), tiny_tokenizer, tmp_path))
    shown = still_data.render_loss_mask(tiny_tokenizer, ids, labels)
    assert shown == f"<|im_start|>user\n{Q1}{EOT}\n<|im_start|>assistant\n«{A1}{EOT}»\n"


# --------------------------------------------------------------------------- bad rows
def one_line_error(data, tokenizer, tmp_path) -> str:
    with pytest.raises(StillError) as caught:
        prep(data, tokenizer, tmp_path)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_invalid_json_names_file_and_line(tiny_tokenizer, tmp_path):
    path = write_jsonl(
        tmp_path / "train.jsonl",
        [
            chat_row(Q1, A1),
            "",
            '{"messages": [',
        ],
    )
    message = one_line_error(section(path), tiny_tokenizer, tmp_path)
    assert "train.jsonl:3: invalid JSON" in message and "on_bad_rows: skip" in message


def test_missing_field_says_which_setting_to_change(tiny_tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [{"question": Q1, "reply": A1}])
    data = section(path, format="instruction", prompt="question", response="answer")
    message = one_line_error(data, tiny_tokenizer, tmp_path)
    assert "train.jsonl:1: field 'answer' is missing" in message
    assert "set data.train.response" in message and "on_bad_rows: skip" in message


@pytest.mark.parametrize(
    "row, expected",
    [
        ({"q": Q1, "a": "  "}, "is empty"),
        ({"q": Q1, "a": 42}, "field 'a' is int, not a string"),
    ],
)
def test_bad_instruction_rows(tiny_tokenizer, tmp_path, row, expected):
    path = write_jsonl(tmp_path / "train.jsonl", [{"q": Q1, "a": A1}, row])
    data = section(path, format="instruction", prompt="q", response="a")
    message = one_line_error(data, tiny_tokenizer, tmp_path)
    assert "train.jsonl:2:" in message and expected in message


@pytest.mark.parametrize(
    "messages, expected",
    [
        ([{"role": "assistant", "content": A1}], "before any 'user'"),
        (
            [
                {"role": "user", "content": Q1},
                {"role": "assistant", "content": A1},
                {"role": "assistant", "content": A2},
            ],
            "'assistant' after 'assistant'",
        ),
        ([{"role": "user", "content": Q1}, {"role": "user", "content": Q2}], "after 'user'"),
        (
            [{"role": "user", "content": Q1}, {"role": "system", "content": SYSTEM}],
            "only the first",
        ),
        ([{"role": "user", "content": Q1}, {"role": "tool", "content": A1}], "unknown role"),
        (
            [{"role": "user", "content": Q1}, {"role": "assistant", "content": ""}],
            "(assistant) is empty",
        ),
        (
            [{"role": "user", "content": Q1}, {"role": "assistant", "content": ["x"]}],
            "not a string",
        ),
        ([{"role": "user", "content": Q1}], "no assistant message"),
    ],
)
def test_bad_chat_rows(tiny_tokenizer, tmp_path, messages, expected):
    path = write_jsonl(tmp_path / "train.jsonl", [chat_row(Q1, A1), {"messages": messages}])
    message = one_line_error(section(path), tiny_tokenizer, tmp_path)
    assert "train.jsonl:2:" in message and expected in message


def test_skip_mode_counts_bad_rows_and_keeps_three_examples(tiny_tokenizer, tmp_path):
    rows = [
        chat_row(Q1, A1),
        "not json",
        {"msgs": []},
        chat_row(Q2, A2),
        {"messages": [{"role": "assistant", "content": A1}]},
        "{",
    ]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    stats = prep(section(path, on_bad_rows="skip"), tiny_tokenizer, tmp_path).stats
    assert (stats.rows, stats.examples, stats.bad_rows) == (6, 2, 4)
    assert [example.split(": ")[0].rsplit("/", 1)[-1] for example in stats.bad_row_examples] == [
        "train.jsonl:2",
        "train.jsonl:3",
        "train.jsonl:5",
    ]


def test_every_row_bad_raises_even_in_skip_mode(tiny_tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", ["nope", {"text": "x"}])
    message = one_line_error(section(path, on_bad_rows="skip"), tiny_tokenizer, tmp_path)
    assert "no usable examples" in message and "2 bad" in message


def test_missing_file_and_empty_glob(tiny_tokenizer, tmp_path):
    message = one_line_error(section(tmp_path / "nope.jsonl"), tiny_tokenizer, tmp_path)
    assert "nope.jsonl" in message
    message = one_line_error(section(tmp_path / "shards-*.jsonl"), tiny_tokenizer, tmp_path)
    assert "no files match" in message and "shards-*.jsonl" in message


# --------------------------------------------------------------------------- truncation
def test_truncate_keeps_first_tokens_and_drops_examples_left_without_loss(tiny_tokenizer, tmp_path):
    short, long_answer, long_prompt = chat_row(Q1, A1), chat_row(Q1, A1 * 4), chat_row(Q1 * 8, A1)
    path = write_jsonl(tmp_path / "train.jsonl", [short, long_answer, long_prompt])
    prepared = prep(section(path, max_len=80), tiny_tokenizer, tmp_path)
    stats = prepared.stats
    assert (stats.examples, stats.truncated, stats.dropped_no_loss) == (2, 1, 1)
    assert prepared.dataset["length"] == [len(prepared.dataset[0]["input_ids"]), 80]
    assert not stats.eos_trained  # the truncated answer lost its <|im_end|>


def test_drop_mode_counts_and_all_dropped_raises(tiny_tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [chat_row(Q1, A1), chat_row(Q1, A1 * 4)])
    stats = prep(section(path, max_len=80, truncation="drop"), tiny_tokenizer, tmp_path).stats
    assert (stats.examples, stats.dropped_too_long, stats.truncated) == (1, 1, 0)
    assert stats.eos_trained
    message = one_line_error(section(path, max_len=8, truncation="drop"), tiny_tokenizer, tmp_path)
    assert "no usable examples" in message and "raise data.max_len" in message


def test_all_masked_dataset_raises(tiny_tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [chat_row(Q1 * 4, A1)])
    message = one_line_error(section(path, max_len=40), tiny_tokenizer, tmp_path)
    assert "no usable examples" in message and "1 with no loss token" in message


# --------------------------------------------------------------------------- cache
def test_second_prepare_reuses_cache_and_changes_miss(tiny_tokenizer, tmp_path, monkeypatch):
    calls = []
    original = formats.Encoder.encode
    monkeypatch.setattr(
        formats.Encoder, "encode", lambda self, example: calls.append(1) or original(self, example)
    )
    path = write_jsonl(tmp_path / "train.jsonl", [chat_row(Q1, A1), chat_row(Q2, A2)])

    def encodes(data) -> int:
        calls.clear()
        result = prep(data, tiny_tokenizer, tmp_path)
        assert result.stats.examples == len(result.dataset)
        return len(calls)

    assert encodes(section(path)) == 2
    assert len(list((tmp_path / "cache").glob("*-train.arrow"))) == 1
    assert encodes(section(path)) == 0
    assert encodes(section(path, max_len=300)) == 2
    write_jsonl(path, [chat_row(Q1, A1), chat_row(Q2, A1)])
    assert encodes(section(path)) == 2
    assert encodes(section(path)) == 0


def test_fingerprint_tracks_data_tokenizer_and_settings(tiny_tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [chat_row(Q1, A1)])
    base = still_data.data_fingerprint(section(path), tiny_tokenizer)
    assert base == still_data.data_fingerprint(section(path), tiny_tokenizer)
    assert base != still_data.data_fingerprint(section(path, train_on="all"), tiny_tokenizer)
    other = copy.deepcopy(tiny_tokenizer)
    other.chat_template = CHATML_TEMPLATE.replace("\n", " ")
    assert base != still_data.data_fingerprint(section(path), other)
    write_jsonl(path, [chat_row(Q1, A2)])
    assert base != still_data.data_fingerprint(section(path), tiny_tokenizer)


# --------------------------------------------------------------------------- sources
def test_csv_json_parquet_and_glob_sources(tiny_tokenizer, tmp_path):
    import pyarrow
    import pyarrow.parquet

    rows = [{"question": Q1, "answer": A1}, {"question": Q2, "answer": A2}]
    (tmp_path / "train.csv").write_text(f'question,answer\n"{Q1}","{A1}"\n"{Q2}","{A2}"\n')
    (tmp_path / "list.json").write_text(json.dumps(rows))
    (tmp_path / "wrapped.json").write_text(json.dumps({"data": rows}))
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), tmp_path / "train.parquet")
    write_jsonl(tmp_path / "part-1.jsonl", rows[:1])
    write_jsonl(tmp_path / "part-0.jsonl", rows[1:] * 2)
    expected_prompts = {
        "train.csv": [Q1, Q2],
        "list.json": [Q1, Q2],
        "wrapped.json": [Q1, Q2],
        "train.parquet": [Q1, Q2],
        "part-*.jsonl": [Q2, Q2, Q1],
    }
    for name, prompts in expected_prompts.items():
        data = section(tmp_path / name, format="instruction", prompt="question", response="answer")
        loaded = strict_rows(data.train)
        assert [row["question"] for _, row in loaded] == prompts, name
        prepared = prep(data, tiny_tokenizer, tmp_path)
        assert prepared.stats.examples == len(prompts)
    origins = [origin for origin, _ in strict_rows(section(tmp_path / "train.csv").train)]
    assert [origin.rsplit("/", 1)[-1] for origin in origins] == ["train.csv:2", "train.csv:3"]
    limited = section(
        tmp_path / "part-*.jsonl",
        format="instruction",
        prompt="question",
        response="answer",
        limit=2,
    )
    assert len(strict_rows(limited.train)) == 2


def test_chat_messages_as_json_text_in_csv(tiny_tokenizer, tmp_path):
    import csv

    with (tmp_path / "chat.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["messages"])
        writer.writerow([json.dumps(chat_row(Q1, A1)["messages"])])
    ids, labels = first(prep(section(tmp_path / "chat.csv"), tiny_tokenizer, tmp_path))
    assert loss_spans(tiny_tokenizer, ids, labels) == [A1 + EOT]


def test_eval_split_inherits_format_and_is_optional(tiny_tokenizer, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"q": Q1, "a": A1}])
    held_out = write_jsonl(tmp_path / "eval.jsonl", [{"q": Q2, "a": A2}])
    data = DataSection(
        train={"path": str(train), "format": "instruction", "prompt": "q", "response": "a"},
        eval={"path": str(held_out)},
    )
    prepared = prep(data, tiny_tokenizer, tmp_path, split="eval")
    ids, labels = first(prepared)
    assert loss_spans(tiny_tokenizer, ids, labels) == [A2 + EOT]
    assert (
        prep(
            section(train, format="instruction", prompt="q", response="a"),
            tiny_tokenizer,
            tmp_path,
            split="eval",
        )
        is None
    )


def test_mix_appends_sources_of_other_formats_in_order_and_keys_the_cache(tiny_tokenizer, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"q": Q1, "a": A1}, {"q": Q2, "a": A2}])
    written = write_jsonl(tmp_path / "written.jsonl", [chat_row(Q2, A1)])
    same_fields = write_jsonl(tmp_path / "more.jsonl", [{"q": Q1, "a": A2}, {"q": Q2, "a": A2}])

    def data(**mix_limit):
        return DataSection(
            train={"path": str(train), "format": "instruction", "prompt": "q", "response": "a",
                   "limit": 1},
            mix=[{"path": str(written), "format": "chat"},
                 {"path": str(same_fields), **mix_limit}],
        )  # fmt: skip

    section_ = data(limit=1)
    assert section_.mix[0].messages == "messages"  # chat's own default field
    assert (section_.mix[1].prompt, section_.mix[1].response) == ("q", "a")  # train's
    prepared = prep(section_, tiny_tokenizer, tmp_path)
    spans = [
        loss_spans(tiny_tokenizer, ids, labels)
        for ids, labels in zip(prepared.dataset["input_ids"], prepared.dataset["labels"])
    ]
    assert spans == [[A1 + EOT], [A1 + EOT], [A2 + EOT]]  # each source's own limit
    assert prepared.stats.rows == 3
    assert len(prep(data(), tiny_tokenizer, tmp_path).dataset) == 4
    base = still_data.data_fingerprint(section_, tiny_tokenizer)
    write_jsonl(written, [chat_row(Q1, A1)])
    assert still_data.data_fingerprint(data(limit=1), tiny_tokenizer) != base
    # the eval split never sees the mix
    assert prep(section_, tiny_tokenizer, tmp_path, split="eval") is None
    # lineage.json names every file of the train split, with its hash
    from types import SimpleNamespace

    from still.rundir import _data_files

    named = [entry["path"] for entry in _data_files(SimpleNamespace(data=section_))]
    assert named == [str(train), str(written), str(same_fields)]


def test_rows_the_chat_template_rejects_are_bad_rows(tiny_tokenizer, tmp_path):
    template = (
        "{% for m in messages %}{% if 'BOOM' in m['content'] %}"
        "{{ raise_exception('no booms here') }}{% endif %}{% endfor %}" + CHATML_TEMPLATE
    )
    path = write_jsonl(tmp_path / "train.jsonl", [chat_row(Q1, A1), chat_row("BOOM", A2)])
    message = one_line_error(section(path, chat_template=template), tiny_tokenizer, tmp_path)
    assert "train.jsonl:2: the chat template rejected this conversation: no booms here" in message
    stats = prep(
        section(path, chat_template=template, on_bad_rows="skip"), tiny_tokenizer, tmp_path
    ).stats
    assert (stats.rows, stats.examples, stats.bad_rows) == (2, 1, 1)


def test_num_proc_tokenizes_in_parallel_like_serial(tiny_tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [chat_row(Q1, A1), chat_row(Q2, A2)] * 4)
    serial = prep(section(path), tiny_tokenizer, tmp_path)
    parallel = prep(section(path, num_proc=2), tiny_tokenizer, tmp_path)
    assert list(parallel.dataset) == list(serial.dataset)
    assert parallel.stats == serial.stats


def test_num_proc_defaults_to_one_process_per_chunk_of_examples_up_to_the_cores(
    tiny_tokenizer, tmp_path, monkeypatch
):
    cores = len(os.sched_getaffinity(0))
    per = still_data.EXAMPLES_PER_PROCESS
    assert still_data.tokenizing_processes(None, per - 1) == 1  # too few to pay for a pool
    assert still_data.tokenizing_processes(None, 2 * per) == min(2, cores)
    assert still_data.tokenizing_processes(None, 1000 * per) == cores
    assert still_data.tokenizing_processes(3, 2) == 2  # an explicit num_proc, capped by examples
    # Unset num_proc really tokenizes in parallel (datasets writes one cache shard per process),
    # with the same result as one process.
    monkeypatch.setattr(still_data, "EXAMPLES_PER_PROCESS", 4)
    monkeypatch.setattr(still_data.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    path = write_jsonl(tmp_path / "train.jsonl", [chat_row(Q1, A1), chat_row(Q2, A2)] * 4)
    parallel = prep(section(path), tiny_tokenizer, tmp_path)
    shards = sorted(p.name.split("-train")[-1] for p in (tmp_path / "cache").glob("*.arrow"))
    assert shards == ["_00000_of_00002.arrow", "_00001_of_00002.arrow"]
    serial = prep(section(path, num_proc=1), tiny_tokenizer, tmp_path / "serial")
    assert list(parallel.dataset) == list(serial.dataset)
