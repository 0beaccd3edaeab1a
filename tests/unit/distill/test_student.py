"""Carving a student out of a teacher: which layers, exact weights, PEFT, Gemma-3, KV cache."""

import copy
import math
from fractions import Fraction

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny_models import build_tiny_llama, build_tiny_tokenizer
from transformers import AutoModelForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig

from distill.student import (
    CarveReport,
    carve_student,
    choose_layers,
    count_parameters,
    layer_importance,
)
from still.distill_sections import StudentInit
from still.errors import StillError


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture
def llama_teacher(tokenizer):
    return build_tiny_llama(tokenizer, hidden=64, layers=4, seed=1).eval()


def gemma3_teacher(layers: int = 4, seed: int = 0) -> Gemma3ForCausalLM:
    """Sliding / full attention alternating, with a window shorter than the test prompts."""
    torch.manual_seed(seed)
    config = Gemma3TextConfig(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=4,
        sliding_window_pattern=2,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=1,
    )
    return Gemma3ForCausalLM(config).eval()


def token_batch(vocab_size: int, rows: int = 2, length: int = 12, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, vocab_size, (rows, length), generator=generator)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def assert_layers_copied(student, teacher, kept: list[int]) -> None:
    teacher_state, student_state = teacher.state_dict(), student.state_dict()
    for key, value in student_state.items():
        if key.startswith("model.layers."):
            index, rest = key[len("model.layers.") :].split(".", 1)
            key = f"model.layers.{kept[int(index)]}.{rest}"
        assert torch.equal(value, teacher_state[key]), key


# --------------------------------------------------------------------------- choose_layers
@pytest.mark.parametrize(
    ("num_layers", "count", "expected"),
    [
        (30, 12, [0, 3, 5, 8, 11, 13, 16, 18, 21, 24, 26, 29]),
        (4, 2, [0, 3]),
        (4, 3, [0, 2, 3]),
        (5, 3, [0, 2, 4]),
        (6, 6, [0, 1, 2, 3, 4, 5]),
        (2, 2, [0, 1]),
    ],
)
def test_uniform_layers_for_known_shapes(num_layers, count, expected):
    assert choose_layers(num_layers, keep_ratio=count / num_layers) == expected


def test_uniform_layers_are_rounded_linspace_keeping_first_and_last():
    for num_layers in range(2, 41):
        for count in range(2, num_layers + 1):
            kept = choose_layers(num_layers, keep_ratio=count / num_layers)
            spaced = [Fraction(position * (num_layers - 1), count - 1) for position in range(count)]
            assert kept == [math.floor(position + Fraction(1, 2)) for position in spaced]
            assert len(kept) == count and kept[0] == 0 and kept[-1] == num_layers - 1


@pytest.mark.parametrize(
    ("num_layers", "keep_ratio", "count"),
    [
        (30, 0.4, 12),
        (5, 0.5, 3),
        (7, 0.5, 4),
        (10, 0.05, 2),
        (4, 1.0, 4),
        (30, 0.49, 15),
        (45, 0.7, 32),
    ],
)
def test_keep_ratio_rounds_half_up_with_at_least_two_layers(num_layers, keep_ratio, count):
    assert len(choose_layers(num_layers, keep_ratio=keep_ratio)) == count


def test_explicit_keep_layers_win_over_ratio():
    assert choose_layers(6, keep_layers=[1, 4], keep_ratio=0.9) == [1, 4]


@pytest.mark.parametrize(
    ("keep_layers", "named"),
    [
        ([0, 4], "index 4"),
        ([-1, 2], "index -1"),
        ([0, 2, 2], "index 2 repeated"),
        ([0, 3, 1], "index 1 out of order"),
        ([], "empty"),
    ],
)
def test_bad_keep_layers_are_one_line_errors(keep_layers, named):
    with pytest.raises(StillError) as error:
        choose_layers(4, keep_layers=keep_layers)
    message = str(error.value)
    assert named in message and "4 layers" in message and "\n" not in message


# --------------------------------------------------------------------------- carving a Llama
def test_student_layers_and_shared_weights_equal_the_teachers(tiny_model_dir_4layers):
    teacher = AutoModelForCausalLM.from_pretrained(tiny_model_dir_4layers).eval()
    student, report = carve_student(teacher, StudentInit(keep_layers=[0, 2, 3]))

    assert_layers_copied(student, teacher, [0, 2, 3])
    assert torch.equal(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight)
    assert torch.equal(student.model.norm.weight, teacher.model.norm.weight)
    assert torch.equal(student.lm_head.weight, teacher.lm_head.weight)
    assert student.lm_head.weight is student.model.embed_tokens.weight  # still tied
    assert student.config.num_hidden_layers == 3
    assert [layer.self_attn.layer_idx for layer in student.model.layers] == [0, 1, 2]

    dropped_layer = count_parameters(teacher.model.layers[1])
    assert report.teacher_params == count_parameters(teacher)
    assert report.student_params == count_parameters(teacher) - dropped_layer
    assert report.param_fraction == pytest.approx(report.student_params / report.teacher_params)
    assert report.kept_layers == [0, 2, 3] and report.teacher_layers == 4
    assert report.importance is None


def test_student_owns_its_weights(llama_teacher):
    teacher_state = copy.deepcopy(llama_teacher.state_dict())
    student, _ = carve_student(llama_teacher, StudentInit(keep_ratio=0.5))
    with torch.no_grad():
        for parameter in student.parameters():
            parameter.add_(1.0)
    for key, value in llama_teacher.state_dict().items():
        assert torch.equal(value, teacher_state[key]), key


def test_student_keeping_all_layers_matches_the_teacher(llama_teacher):
    student, report = carve_student(llama_teacher, StudentInit(keep_ratio=1.0))
    batch = token_batch(llama_teacher.config.vocab_size)
    assert report.kept_layers == [0, 1, 2, 3] and report.param_fraction == 1.0
    assert torch.equal(logits(student, batch), logits(llama_teacher, batch))


def test_student_keeps_the_teachers_dtype_and_attention_kernel(llama_teacher):
    llama_teacher.set_attn_implementation("eager")
    teacher = llama_teacher.to(torch.bfloat16)
    student, _ = carve_student(teacher, StudentInit(keep_layers=[1, 3]))
    assert student.dtype == torch.bfloat16
    assert student.config._attn_implementation == "eager"
    assert_layers_copied(student, teacher, [1, 3])


def generate(model, prompt: torch.Tensor, use_cache: bool) -> torch.Tensor:
    return model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=6,
        do_sample=False,
        use_cache=use_cache,
        pad_token_id=model.config.pad_token_id,
    )


def test_student_generates_the_same_with_and_without_kv_cache(llama_teacher):
    student, _ = carve_student(llama_teacher, StudentInit(keep_layers=[0, 2, 3]))
    prompt = token_batch(llama_teacher.config.vocab_size, rows=1, length=7)["input_ids"]
    cached = generate(student, prompt, use_cache=True)
    assert cached.shape[1] > prompt.shape[1]
    assert torch.equal(cached, generate(student, prompt, use_cache=False))


def test_summary_is_one_line_and_abbreviates_long_layer_lists():
    report = CarveReport(
        kept_layers=[0, 3, 5, 8, 11, 13, 16, 18, 21, 24, 26, 29],
        teacher_layers=30,
        teacher_params=134_515_008,
        student_params=81_000_000,
        importance=None,
    )
    assert report.summary() == (
        "student keeps layers [0, 3, 5, ..., 29] (12/30): 81.0M of 134.5M parameters (60.2%)"
    )


def test_a_model_without_decoder_layers_is_refused():
    with pytest.raises(StillError, match="model.model.layers"):
        carve_student(torch.nn.Linear(2, 2), StudentInit(keep_ratio=0.5))


# --------------------------------------------------------------------------- importance
def make_identity(layer) -> None:
    """Zero the block's two output projections: both residual branches then add nothing."""
    with torch.no_grad():
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()


@pytest.mark.parametrize("identity_layer", [1, 2])
def test_an_identity_layer_scores_zero_and_is_dropped_first(llama_teacher, identity_layer):
    make_identity(llama_teacher.model.layers[identity_layer])
    batches = [token_batch(llama_teacher.config.vocab_size, seed=seed) for seed in range(2)]
    init = StudentInit(keep_ratio=0.75, strategy="importance")

    student, report = carve_student(llama_teacher, init, batches)

    assert report.importance[identity_layer] == pytest.approx(0.0, abs=1e-6)
    others = [score for index, score in enumerate(report.importance) if index != identity_layer]
    assert min(others) > 1e-3
    assert report.kept_layers == [index for index in range(4) if index != identity_layer]
    assert_layers_copied(student, llama_teacher, report.kept_layers)


def test_importance_keeps_first_and_last_even_when_they_score_lowest(llama_teacher):
    scores = [0.0, 0.5, 0.9, 0.3, 0.2, 0.0]
    assert choose_layers(6, keep_ratio=0.5, strategy="importance", importance=scores) == [0, 2, 5]


def test_importance_ignores_padding_tokens(llama_teacher):
    vocab_size = llama_teacher.config.vocab_size
    short = token_batch(vocab_size, rows=1, length=6, seed=1)
    long = token_batch(vocab_size, rows=1, length=10, seed=2)
    pad_id = llama_teacher.config.pad_token_id
    padded_ids = torch.cat([short["input_ids"], torch.full((1, 4), pad_id)], dim=1)
    padded = {
        "input_ids": torch.cat([padded_ids, long["input_ids"]]),
        "attention_mask": torch.cat([torch.tensor([[1] * 6 + [0] * 4]), long["attention_mask"]]),
    }
    separate = layer_importance(llama_teacher, [short, long])
    together = layer_importance(llama_teacher, [padded])
    assert together == pytest.approx(separate, abs=1e-5)


def test_importance_agrees_with_hidden_states_before_the_last_layer(llama_teacher):
    batch = token_batch(llama_teacher.config.vocab_size)
    with torch.no_grad():
        states = llama_teacher(**batch, output_hidden_states=True).hidden_states
    expected = [
        1 - torch.cosine_similarity(states[index], states[index + 1], dim=-1).mean().item()
        for index in range(3)  # the last entry is after the final norm, so not layer 3's output
    ]
    assert layer_importance(llama_teacher, [batch])[:3] == pytest.approx(expected, abs=1e-5)


def test_importance_needs_calibration_batches(llama_teacher):
    with pytest.raises(StillError, match="calibration"):
        carve_student(llama_teacher, StudentInit(keep_ratio=0.5, strategy="importance"))


def test_importance_leaves_the_teacher_in_its_mode(llama_teacher):
    llama_teacher.train()
    layer_importance(llama_teacher, [token_batch(llama_teacher.config.vocab_size)])
    assert llama_teacher.training


# --------------------------------------------------------------------------- PEFT teacher
def test_peft_teacher_is_carved_merged_and_left_unchanged(tokenizer):
    base = build_tiny_llama(tokenizer, hidden=64, layers=4, seed=3)
    lora = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False
    )  # random B: the adapter really changes outputs
    teacher = get_peft_model(base, lora).eval()
    batch = token_batch(base.config.vocab_size)
    logits_before = logits(teacher, batch)
    state_before = copy.deepcopy(teacher.state_dict())
    with teacher.disable_adapter():
        assert not torch.allclose(logits(teacher, batch), logits_before)

    init = StudentInit(keep_layers=[0, 1, 3])
    student, report = carve_student(teacher, init)
    merged = copy.deepcopy(teacher).merge_and_unload()
    from_merged, merged_report = carve_student(merged, init)

    merged_state = from_merged.state_dict()
    assert all(torch.equal(value, merged_state[key]) for key, value in student.state_dict().items())
    assert report == merged_report
    assert torch.equal(logits(teacher, batch), logits_before)
    assert teacher.state_dict().keys() == state_before.keys()
    assert all(torch.equal(value, state_before[key]) for key, value in teacher.state_dict().items())


# --------------------------------------------------------------------------- Gemma-3
def test_gemma3_student_slices_layer_types_and_copies_weights(tmp_path):
    teacher = gemma3_teacher()
    assert teacher.config.layer_types == [
        "sliding_attention",
        "full_attention",
        "sliding_attention",
        "full_attention",
    ]

    student, report = carve_student(teacher, StudentInit(keep_layers=[0, 2, 3]))

    assert student.config.layer_types == [
        "sliding_attention",
        "sliding_attention",
        "full_attention",
    ]
    windows = [layer.self_attn.sliding_window for layer in student.model.layers]
    assert windows == [4, 4, None]
    assert [layer.self_attn.layer_idx for layer in student.model.layers] == [0, 1, 2]
    assert_layers_copied(student, teacher, [0, 2, 3])
    assert report.student_params < report.teacher_params

    student.save_pretrained(tmp_path)  # the sliced config must pass validation on reload
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.layer_types == student.config.layer_types
    batch = token_batch(teacher.config.vocab_size)
    assert torch.equal(logits(reloaded, batch), logits(student, batch))


def test_gemma3_student_generates_with_cache_and_full_copy_matches():
    teacher = gemma3_teacher(seed=1)
    prompt = token_batch(teacher.config.vocab_size, rows=1, length=7)["input_ids"]
    student, _ = carve_student(teacher, StudentInit(keep_layers=[0, 1, 3]))
    assert torch.equal(generate(student, prompt, True), generate(student, prompt, False))

    full_copy, _ = carve_student(teacher, StudentInit(keep_ratio=1.0))
    batch = token_batch(teacher.config.vocab_size)
    assert torch.equal(logits(full_copy, batch), logits(teacher, batch))


# --------------------------------------------------------------------------- size budget
