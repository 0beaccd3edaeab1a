"""Tiny local models and tokenizers, built in the tests: nothing comes from the hub.

Imported by tests/conftest.py (fixtures) and by tests that need a builder directly:
`from tiny_models import build_tiny_llama` (tests/ is on sys.path through pytest's rootdir
conftest). A plain module, because two conftest.py files cannot both be imported as `conftest`.
"""

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = [
    "What does json.dumps do? Serialize obj to a JSON formatted str.",
    "What does os.path.join do? Join two or more pathname components.",
    "The quick brown fox jumps over the lazy dog.",
    "Return a new list containing all items from the iterable in ascending order.",
    "system user assistant question answer response instruction input output",
    (
        "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ "
        "0123456789 .,:;!?()[]{}'\"-_=+/\\*&^%$#@"
    ),
]
# Question/answer pairs the recipe tests train on (a few Python builtins, one per line).
QA = [
    ("What does json.dumps do?", "Serialize obj to a JSON formatted str."),
    ("What does os.path.join do?", "Join two or more pathname components."),
    ("What does sorted do?", "Return a new list containing all items in ascending order."),
    ("What does abs do?", "Return the absolute value of the argument."),
    ("What does len do?", "Return the number of items in a container."),
    ("What does min do?", "Return the smallest item of an iterable."),
    ("What does max do?", "Return the largest item of an iterable."),
    ("What does repr do?", "Return the canonical string representation of the object."),
]
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]


def build_tiny_tokenizer(vocab_size: int = 320):
    """A byte-level BPE with ChatML specials; eos is <|im_end|>, pad is a separate <pad>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<pad>",
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def build_tiny_llama(tokenizer, hidden: int = 32, layers: int = 2, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        # With the default 0.02 the tied output layer gives near-uniform logits that a LoRA
        # (which cannot touch embeddings) is unable to sharpen; 0.2 gives logits of std ~1.
        initializer_range=0.2,
    )
    return LlamaForCausalLM(config)


def build_tiny_softcapped(tokenizer, cap: float = 0.5, seed: int = 0):
    """A tiny Gemma-2: its logits are tanh-soft-capped after the head (cap/tanh(logits/cap)),
    so head(hidden) is not its logits. A small cap makes the difference large at random init."""
    import torch
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(seed)
    config = Gemma2Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        final_logit_softcapping=cap,
        initializer_range=0.2,
    )
    return Gemma2ForCausalLM(config)
