"""GGUF export (publish/gguf.py): tiny Llama and Gemma-3 models written with the gguf package
and read back by transformers (`from_pretrained(dir, gguf_file=...)`), compared logit by logit."""

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from tiny_models import build_tiny_llama, build_tiny_tokenizer

from publish import gguf as gguf_export
from still.errors import StillError

TEXTS = [
    "What does json.dumps do? Serialize obj to a JSON formatted str.",
    "<|im_start|>user\nWhat does abs do?<|im_end|>\n<|im_start|>assistant\n",
]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def llama(tokenizer):
    return build_tiny_llama(tokenizer).eval()


def tiny_gemma3(tokenizer, **overrides):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    settings = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        sliding_window=16,
        initializer_range=0.2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = Gemma3ForCausalLM(Gemma3TextConfig(**{**settings, **overrides}))
    with torch.no_grad():  # norms start at zero (scale 1 + w); make the +1 offset matter
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.normal_(0, 0.3)
    return model.eval()


@pytest.mark.parametrize("gguf_type", ["f16", "q8_0"])
def test_tiny_llama_round_trip(tmp_path, llama, tokenizer, gguf_type):
    path = gguf_export.export_gguf(
        llama, tokenizer, tmp_path / f"m-{gguf_type}.gguf", gguf_type, name="tiny"
    )
    gguf_export.check_config(path, llama.config)
    report = gguf_export.verify_gguf(path, llama, tokenizer, gguf_type, TEXTS)
    assert report["exact_max_abs_diff"] <= gguf_export.EXACT_TOLERANCE
    assert 0 < report["rms_relative_diff"] <= gguf_export.TOLERANCES[gguf_type]
    assert report["top1_agreement"] > 0.9


def test_file_carries_tokenizer_and_quantized_types(tmp_path, llama, tokenizer):
    from gguf import GGMLQuantizationType, GGUFReader

    f16 = gguf_export.export_gguf(
        llama, tokenizer, tmp_path / "a.gguf", "f16", name="tiny", license="mit"
    )
    q8 = gguf_export.export_gguf(llama, tokenizer, tmp_path / "b.gguf", "q8_0", name="tiny")
    assert q8.stat().st_size < f16.stat().st_size
    reader = GGUFReader(q8)
    types = {tensor.name: tensor.tensor_type for tensor in reader.tensors}
    assert types["blk.0.attn_q.weight"] == GGMLQuantizationType.Q8_0
    assert types["blk.0.attn_norm.weight"] == GGMLQuantizationType.F32
    assert "output.weight" not in types  # tied to token_embd
    assert reader.fields["tokenizer.chat_template"].contents() == tokenizer.chat_template
    assert reader.fields["tokenizer.ggml.eos_token_id"].contents() == tokenizer.eos_token_id
    assert len(reader.fields["tokenizer.ggml.tokens"].contents()) == len(tokenizer)
    assert GGUFReader(f16).fields["general.license"].contents() == "mit"


def test_without_the_rotary_permutation_the_check_fails(tmp_path, llama, tokenizer, monkeypatch):
    unpermuted = replace(gguf_export.ARCHS["llama"], permute_qk=False)
    monkeypatch.setitem(gguf_export.ARCHS, "llama", unpermuted)
    path = gguf_export.export_gguf(llama, tokenizer, tmp_path / "bad.gguf", "f16", name="tiny")
    with pytest.raises(StillError, match="loads back different"):
        gguf_export.verify_gguf(path, llama, tokenizer, "f16", TEXTS, check_tokenizer=False)


@pytest.mark.parametrize("gguf_type", ["f16", "q8_0"])
def test_tiny_gemma3_round_trip(tmp_path, tokenizer, gguf_type):
    model = tiny_gemma3(tokenizer)
    texts = [TEXTS[0] * 3]  # longer than the sliding window
    path = gguf_export.export_gguf(
        model, tokenizer, tmp_path / "g.gguf", gguf_type, name="tiny-gemma"
    )
    gguf_export.check_config(path, model.config)
    report = gguf_export.verify_gguf(path, model, tokenizer, gguf_type, texts)
    assert report["exact_max_abs_diff"] <= gguf_export.EXACT_TOLERANCE
    assert report["rms_relative_diff"] <= gguf_export.TOLERANCES[gguf_type]


def test_gemma3_without_the_norm_offset_fails(tmp_path, tokenizer, monkeypatch):
    model = tiny_gemma3(tokenizer)
    no_offset = replace(gguf_export.ARCHS["gemma3_text"], norm_offset=0.0)
    monkeypatch.setitem(gguf_export.ARCHS, "gemma3_text", no_offset)
    path = gguf_export.export_gguf(model, tokenizer, tmp_path / "g.gguf", "f16", name="tiny-gemma")
    with pytest.raises(StillError, match="loads back different"):
        gguf_export.verify_gguf(path, model, tokenizer, "f16", TEXTS, check_tokenizer=False)


def test_config_the_loader_cannot_read_is_refused(tmp_path, tokenizer):
    model = tiny_gemma3(tokenizer, query_pre_attn_scalar=16)  # transformers reads back 256
    path = gguf_export.export_gguf(model, tokenizer, tmp_path / "g.gguf", "f16", name="tiny-gemma")
    with pytest.raises(StillError, match="query_pre_attn_scalar"):
        gguf_export.check_config(path, model.config)


def test_unsupported_architecture_and_type(tmp_path, llama, tokenizer):
    with pytest.raises(StillError, match="supports"):
        gguf_export.arch_spec(SimpleNamespace(model_type="gpt2"))
    with pytest.raises(StillError, match="unknown GGUF type"):
        gguf_export.export_gguf(llama, tokenizer, tmp_path / "x.gguf", "q4_k", name="tiny")
    assert not (tmp_path / "x.gguf").exists()


def tiny_gemma_tokenizer():
    """A sentencepiece-style BPE (▁ for spaces, byte fallback) in transformers' GemmaTokenizer."""
    import json

    from tiny_models import CORPUS
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers.models.gemma.tokenization_gemma import GemmaTokenizer

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
    backend = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    backend.normalizer = normalizers.Replace(" ", "▁")
    backend.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")
    bytes_ = [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials + bytes_, show_progress=False
    )
    backend.train_from_iterator(CORPUS * 4, trainer=trainer)
    model = json.loads(backend.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    tokenizer = GemmaTokenizer(vocab=model["vocab"], merges=merges)
    turns = ["<start_of_turn>", "<end_of_turn>"]
    tokenizer.add_special_tokens({"additional_special_tokens": turns})
    tokenizer.chat_template = (
        "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}"
        "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
    )
    return tokenizer


def test_gemma_style_sentencepiece_tokenizer_round_trips(tmp_path):
    tokenizer = tiny_gemma_tokenizer()
    model = tiny_gemma3(tokenizer)
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What does abs do?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    texts = ["What does  json.dumps do? é ü 12345", chat]  # double space, byte fallback, specials
    path = gguf_export.export_gguf(model, tokenizer, tmp_path / "g.gguf", "q8_0", name="tiny-gemma")
    report = gguf_export.verify_gguf(path, model, tokenizer, "q8_0", texts)  # raises if ids differ
    assert report["exact_max_abs_diff"] <= gguf_export.EXACT_TOLERANCE


def test_a_tokenizer_that_splits_differently_is_caught(tmp_path, llama, tokenizer):
    path = gguf_export.export_gguf(llama, tokenizer, tmp_path / "m.gguf", "f16", name="tiny")
    other = build_tiny_tokenizer(vocab_size=300)  # same specials, fewer merges
    with pytest.raises(StillError, match="splits .* differently"):
        gguf_export.verify_gguf(path, llama, other, "f16", TEXTS)


@pytest.mark.parametrize("gguf_type", ["q8_0", "q4_0"])
def test_rows_that_are_not_whole_blocks_are_refused_by_width(tmp_path, tokenizer, gguf_type):
    odd = build_tiny_llama(tokenizer, hidden=40).eval()  # a width-pruned student's odd width
    with pytest.raises(StillError, match="matrix rows of 40, 80 values, not a multiple of 32"):
        gguf_export.export_gguf(odd, tokenizer, tmp_path / "o.gguf", gguf_type, name="odd")
    assert not (tmp_path / "o.gguf").exists()
    gguf_export.export_gguf(odd, tokenizer, tmp_path / "o.gguf", "f16", name="odd")  # f16 can
