"""Tiny random twins of the model families users bring, built in the tests (nothing from the hub).

Each family is its real transformers class at a tiny size, with the traits that break kits.
Chat formats are written from each format's public description.

- llama3: <|start_header_id|>role<|end_header_id|>\n\n…<|eot_id|>; untied head; pad is a
  reserved token; rope theta 5e5.
- qwen2 (2.5): ChatML with Qwen2.5's default system prompt; q/k/v biases; no bos; vocab rows
  padded to a multiple of 64.
- qwen3: ChatML where the assistant turn after the last user message carries an empty
  <think></think> block and earlier ones do not; q/k RMSNorms; head_dim apart from hidden/heads.
- gemma3: <start_of_turn>user|model\n…<end_of_turn>, the system prompt folded into the first
  user turn; sliding and global layers; eos <eos> is not the end-of-turn token.
- mistral: [INST] … [/INST] …</s>, the system prompt before the last user turn; pad == eos.
- phi3: <|user|>\n…<|end|>\n with eos after the last turn; fused qkv_proj and gate_up_proj;
  padded vocab rows.
- qwen3_moe: as qwen3, with 4 experts and 2 per token (fused expert weights).

`build_tokenizer(name)`, `build_model(name, tokenizer)` and `save_twin(name, path)` (model,
tokenizer and generation_config as an HF dir) are the API; `FAMILIES` lists the names.
`chat_rows()` and `write_finetune_recipe(...)` are the multi-turn data and the recipe the
family tests (tests/unit/families/) train on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tiny_models import CORPUS

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{{ message['content'] | trim }}{{ '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)
QWEN25_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. "
    "You are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Qwen3: assistant turns after the last user message carry a (here empty) reasoning block;
# earlier ones are rendered without it, so a turn changes once a later user turn follows.
QWEN3_TEMPLATE = (
    "{% set ns = namespace(last_query=-1) %}"
    "{% for message in messages %}{% if message['role'] == 'user' %}"
    "{% set ns.last_query = loop.index0 %}{% endif %}{% endfor %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}"
    "{% if loop.index0 > ns.last_query %}{{ '<think>\n\n</think>\n\n' }}{% endif %}"
    "{{ message['content'] + '<|im_end|>\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}"
    "{{ '<think>\n\n</think>\n\n' }}{% endif %}{% endif %}"
)
GEMMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}"
    "{% set first = messages[0]['content'] + '\n\n' %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set first = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + (first if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
MISTRAL_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set system = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% set ns = namespace(last_user=-1) %}"
    "{% for message in loop_messages %}{% if message['role'] == 'user' %}"
    "{% set ns.last_user = loop.index0 %}{% endif %}{% endfor %}"
    "{{ bos_token }}{% for message in loop_messages %}"
    "{% if message['role'] == 'user' %}"
    "{% if loop.index0 == ns.last_user and system %}"
    "{{ '[INST] ' + system + '\n\n' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% endif %}"
    "{% else %}{{ ' ' + message['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
)
PHI3_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)


@dataclass(frozen=True)
class Family:
    name: str
    model_type: str
    specials: tuple[str, ...]
    chat_template: str
    eos: str
    pad: str
    bos: str | None
    end_of_turn: str  # the token that closes an assistant turn
    stops: tuple[str, ...]  # generation_config.eos_token_id, as the real model ships it
    vocab_multiple: int = 1  # config.vocab_size is len(tokenizer) rounded up to this
    config: dict = field(default_factory=dict)


_ATTENTION = {"num_attention_heads": 4, "num_key_value_heads": 2}
FAMILY_LIST = [
    Family(
        "llama3", "llama",
        ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
         "<|eot_id|>", "<|finetune_right_pad_id|>"),
        LLAMA3_TEMPLATE, eos="<|eot_id|>", pad="<|finetune_right_pad_id|>",
        bos="<|begin_of_text|>", end_of_turn="<|eot_id|>",
        stops=("<|end_of_text|>", "<|eot_id|>"),
        config={"rope_theta": 500000.0, "tie_word_embeddings": False},
    ),
    Family(
        "qwen2", "qwen2", ("<|endoftext|>", "<|im_start|>", "<|im_end|>"), QWEN25_TEMPLATE,
        eos="<|im_end|>", pad="<|endoftext|>", bos=None, end_of_turn="<|im_end|>",
        stops=("<|im_end|>", "<|endoftext|>"), vocab_multiple=64,
        config={"tie_word_embeddings": True},
    ),
    Family(
        "qwen3", "qwen3", ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"),
        QWEN3_TEMPLATE, eos="<|im_end|>", pad="<|endoftext|>", bos=None,
        end_of_turn="<|im_end|>", stops=("<|im_end|>", "<|endoftext|>"), vocab_multiple=64,
        config={"head_dim": 16, "tie_word_embeddings": True},
    ),
    Family(
        "gemma3", "gemma3_text",
        ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"),
        GEMMA3_TEMPLATE, eos="<eos>", pad="<pad>", bos="<bos>", end_of_turn="<end_of_turn>",
        stops=("<eos>", "<end_of_turn>"),
        config={
            "head_dim": 8, "query_pre_attn_scalar": 8, "sliding_window": 4,
            "layer_types": ["sliding_attention", "full_attention"],
        },
    ),
    Family(
        "mistral", "mistral", ("<unk>", "<s>", "</s>", "[INST]", "[/INST]"), MISTRAL_TEMPLATE,
        eos="</s>", pad="</s>", bos="<s>", end_of_turn="</s>", stops=("</s>",),
        config={"tie_word_embeddings": False, "sliding_window": None},
    ),
    Family(
        "phi3", "phi3",
        ("<unk>", "<s>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
        PHI3_TEMPLATE, eos="<|endoftext|>", pad="<|endoftext|>", bos="<s>", end_of_turn="<|end|>",
        stops=("<|endoftext|>", "<|end|>"), vocab_multiple=64,
        config={"tie_word_embeddings": False},
    ),
    Family(
        "qwen3_moe", "qwen3_moe",
        ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"),
        QWEN3_TEMPLATE, eos="<|im_end|>", pad="<|endoftext|>", bos=None,
        end_of_turn="<|im_end|>", stops=("<|im_end|>", "<|endoftext|>"), vocab_multiple=64,
        config={
            "head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2,
            "moe_intermediate_size": 16, "decoder_sparse_step": 1, "mlp_only_layers": [],
            "tie_word_embeddings": False,
        },
    ),
]
FAMILY = {family.name: family for family in FAMILY_LIST}
FAMILIES = [family.name for family in FAMILY_LIST]
DENSE = [name for name in FAMILIES if name != "qwen3_moe"]


def build_tokenizer(name: str, vocab_size: int = 300):
    """A byte-level BPE trained on the test corpus with the family's specials and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    family = FAMILY[name]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(family.specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS * 4, trainer=trainer)
    specials = {"eos_token": family.eos, "pad_token": family.pad}
    if family.bos is not None:
        specials["bos_token"] = family.bos
    if "<unk>" in family.specials:
        specials["unk_token"] = "<unk>"
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **specials)
    tokenizer.chat_template = family.chat_template
    return tokenizer


def model_config(name: str, tokenizer, *, hidden: int = 32, layers: int = 2, **overrides):
    """The family's config class at a tiny size (overrides win)."""
    from transformers import AutoConfig

    family = FAMILY[name]
    rows = -(-len(tokenizer) // family.vocab_multiple) * family.vocab_multiple
    settings = {
        "vocab_size": rows,
        "hidden_size": hidden,
        "intermediate_size": hidden * 2,
        "num_hidden_layers": layers,
        "max_position_embeddings": 512,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.convert_tokens_to_ids(list(family.stops)),
        "pad_token_id": tokenizer.pad_token_id,
        # A tied head at 0.02 gives near-uniform logits; 0.2 gives logits of std ~1.
        "initializer_range": 0.2,
        **_ATTENTION,
        **family.config,
        **overrides,
    }
    if "layer_types" in settings and len(settings["layer_types"]) != layers:
        pattern = family.config["layer_types"]
        settings["layer_types"] = [pattern[i % len(pattern)] for i in range(layers)]
    return AutoConfig.for_model(family.model_type, **settings)


def build_model(name: str, tokenizer, *, seed: int = 0, **overrides):
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    torch.manual_seed(seed)
    config = model_config(name, tokenizer, **overrides)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )
    return model


def save_twin(name: str, path, *, seed: int = 0, **overrides):
    """Model, tokenizer and generation_config of a tiny `name` twin, saved as an HF dir."""
    tokenizer = build_tokenizer(name)
    build_model(name, tokenizer, seed=seed, **overrides).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# A chat conversation per row: system, then two user/assistant turns (a Mistral template moves
# the system prompt into the last [INST]; Qwen3 renders earlier answers without <think>).
QA_PAIRS = [
    ("What does abs do?", "Return the absolute value of a number."),
    ("What does len do?", "Return the number of items in a container."),
    ("What does min do?", "Return the smallest item of an iterable."),
    ("What does max do?", "Return the largest item of an iterable."),
    ("What does sorted do?", "Return a new sorted list from the items."),
    ("What does repr do?", "Return the canonical string of the object."),
    ("What does json.dumps do?", "Serialize obj to a JSON formatted str."),
    ("What does os.path.join do?", "Join two or more pathname components."),
]


def chat_rows() -> list[dict]:
    rows = []
    for i, (question, answer) in enumerate(QA_PAIRS):
        follow_up, follow_answer = QA_PAIRS[(i + 3) % len(QA_PAIRS)]
        rows.append(
            {
                "messages": [
                    {"role": "system", "content": "Answer in one short sentence."},
                    {"role": "user", "content": question},
                    {"role": "assistant", "content": answer},
                    {"role": "user", "content": follow_up},
                    {"role": "assistant", "content": follow_answer},
                ]
            }
        )
    return rows


def write_finetune_recipe(directory, name: str, method: str, model_ref, extra: str = "") -> str:
    """A finetune recipe for a family twin on the chat rows in `directory`; runs under
    directory/runs. LoRA dropout 0: PEFT adapts a MoE's fused experts without dropout."""
    lora = "" if method == "full" else "lora: {r: 4, alpha: 8, dropout: 0.0}\n"
    text = (
        f"# Run: still run {name}-{method}.yaml\n"
        f"kind: finetune\nname: {name}-{method}\noutput_dir: {directory / 'runs'}\n"
        f'model: {{ref: "{model_ref}"}}\nmethod: {method}\n{lora}'
        "data:\n  train: {path: chat.jsonl, format: chat}\n  max_len: 160\n"
        "train: {lr: 1.0e-2, batch_size: 4, max_steps: 3, save_steps: 100, warmup_ratio: 0.0, "
        "gradient_checkpointing: false, "
        "seed: 3}\n" + extra
    )
    path = directory / f"{name}-{method}.yaml"
    path.write_text(text)
    return str(path)
