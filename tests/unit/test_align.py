"""distill/align.py: character-offset alignment of two tokenizations, and the one-to-one
vocabulary map, on two tokenizers built here whose merges, sizes and templates differ."""

import pytest
from tiny_models import QA, build_tiny_tokenizer
from xtok_models import build_metaspace_tokenizer

from distill.align import (
    NO_POSITION,
    Rendering,
    align_positions,
    require_offsets,
    token_bytes,
    vocab_map,
)
from still.errors import StillError
from still.models import end_of_turn_token


@pytest.fixture(scope="module")
def student_tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def teacher_tokenizer():
    return build_metaspace_tokenizer()


def conversation(question, answer):
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def pieces(tokenizer, rendering, index):
    start, end = rendering.offsets[index]
    return rendering.text[start:end]


def test_aligned_positions_predict_tokens_starting_at_the_same_character(
    student_tokenizer, teacher_tokenizer
):
    messages = conversation(*QA[0])
    student = Rendering.of(student_tokenizer, messages)
    teacher = Rendering.of(teacher_tokenizer, messages)
    positions = align_positions(student, teacher, messages)
    answer = QA[0][1]
    s_start = student.text.index(answer)
    t_start = teacher.text.index(answer)
    pairs = [(i, p) for i, p in enumerate(positions) if p != NO_POSITION]
    assert len(pairs) >= 5
    for student_pos, teacher_pos in pairs[:-1]:  # the last pair is the end-of-turn tokens
        s_piece = pieces(student_tokenizer, student, student_pos + 1)
        t_piece = pieces(teacher_tokenizer, teacher, teacher_pos + 1)
        s_char = student.offsets[student_pos + 1][0] + len(s_piece) - len(s_piece.lstrip())
        t_char = teacher.offsets[teacher_pos + 1][0] + len(t_piece) - len(t_piece.lstrip())
        assert s_char - s_start == t_char - t_start
        assert s_piece.strip()[0] == t_piece.strip()[0]
    last_student, last_teacher = pairs[-1]
    assert student_tokenizer.convert_ids_to_tokens(student.ids[last_student + 1]) == "<|im_end|>"
    assert teacher_tokenizer.convert_ids_to_tokens(teacher.ids[last_teacher + 1]) == (
        "<end_of_turn>"
    )
    # the prompt and the scaffolding are never aligned
    assert all(p == NO_POSITION for p in positions[: student.ids.index(student.ids[0], 1) - 1])


def test_hand_made_merges_that_differ():
    """'ab cd' split as [ab][ Ġcd] by one tokenizer and [a][b][▁c][d] by the other: only the
    tokens starting at the same characters pair up (a/ab and c/cd)."""

    text = "Q: x A: ab cd"
    start = text.index("ab")
    student = Rendering(text, [1, 2, 3], [(0, start), (start, start + 2), (start + 2, start + 5)])
    teacher = Rendering(
        text,
        [1, 2, 3, 4, 5],
        [
            (0, start),
            (start, start + 1),
            (start + 1, start + 2),
            (start + 2, start + 4),
            (start + 4, start + 5),
        ],
    )
    messages = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "ab cd"}]
    assert align_positions(student, teacher, messages) == [0, 2, NO_POSITION]


def test_content_missing_from_a_rendering_leaves_positions_unaligned(student_tokenizer):
    messages = conversation(*QA[1])
    student = Rendering.of(student_tokenizer, messages)
    teacher = Rendering.of_text(student_tokenizer, "something else entirely")
    assert set(align_positions(student, teacher, messages)) == {NO_POSITION}


def test_identical_tokenizers_align_every_answer_position(student_tokenizer):
    messages = conversation(*QA[2])
    rendering = Rendering.of(student_tokenizer, messages)
    positions = align_positions(rendering, rendering, messages)
    aligned = [i for i, p in enumerate(positions) if p != NO_POSITION]
    assert aligned and all(positions[i] == i for i in aligned)
    answer_tokens = [
        i for i, (s, e) in enumerate(rendering.offsets) if s >= rendering.text.index(QA[2][1])
    ]
    assert len(aligned) >= len(answer_tokens) - 2  # every answer token, its eot, not the '\n'


def test_vocab_map_is_one_to_one_on_normalised_strings(student_tokenizer, teacher_tokenizer):
    mapping = vocab_map(
        student_tokenizer, teacher_tokenizer, len(student_tokenizer), len(teacher_tokenizer)
    )
    assert 0 < mapping.overlap < 1
    assert len(set(mapping.student_ids.tolist())) == len(mapping.student_ids)
    assert len(set(mapping.teacher_ids.tolist())) == len(mapping.teacher_ids)
    student_bytes = token_bytes(student_tokenizer, len(student_tokenizer))
    teacher_bytes = token_bytes(teacher_tokenizer, len(teacher_tokenizer))
    eot = (end_of_turn_token(student_tokenizer), end_of_turn_token(teacher_tokenizer))
    pairs = list(zip(mapping.student_ids.tolist(), mapping.teacher_ids.tolist()))
    assert eot in pairs
    for s, t in pairs:
        if (s, t) != eot:
            assert student_bytes[s] == teacher_bytes[t]
    # 'Ġt' (byte-level) and '▁t' (sentencepiece) are the same token: a space then t
    s_id = student_tokenizer.convert_tokens_to_ids("Ġt")
    t_id = teacher_tokenizer.convert_tokens_to_ids("▁t")
    assert (s_id, t_id) in pairs


def test_identical_vocabularies_map_every_token(student_tokenizer):
    size = len(student_tokenizer)
    mapping = vocab_map(student_tokenizer, student_tokenizer, size, size)
    assert (mapping.student_ids == mapping.teacher_ids).all()
    specials = len(set(student_tokenizer.all_special_ids))
    assert len(mapping.student_ids) >= size - specials


def test_slow_tokenizer_is_refused_with_the_model_named():
    class Slow:
        is_fast = False

    with pytest.raises(StillError, match="teacher some/model has a slow tokenizer") as error:
        require_offsets(Slow(), "teacher", "some/model")
    assert "fast tokenizer" in error.value.hint
