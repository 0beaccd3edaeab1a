"""A second tiny tokenizer family for the cross-tokenizer tests: a sentencepiece-style BPE
(spaces as '▁', Metaspace) with a Gemma-style chat template and its own specials, so it differs
from tests/tiny_models.py's byte-level ChatML tokenizer in merges, vocab size, scaffolding and
end-of-turn token. Built in the test: nothing comes from the hub."""

from tiny_models import CORPUS, build_tiny_llama

GEMMA_STYLE_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + (message['content'] | trim) + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
TEACHER_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]


def build_metaspace_tokenizer(vocab_size: int = 400, corpus=CORPUS):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    alphabet = sorted(set("".join(corpus) + "\n▁"))
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=TEACHER_SPECIALS,
        initial_alphabet=alphabet,
        show_progress=False,
    )
    backend.train_from_iterator(list(corpus) * 3, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        pad_token="<pad>",
    )
    tokenizer.chat_template = GEMMA_STYLE_TEMPLATE
    return tokenizer


def save_teacher(path, vocab_size: int = 400, hidden: int = 48, seed: int = 5):
    """A random tiny Llama on the Metaspace tokenizer, saved as an HF dir."""
    tokenizer = build_metaspace_tokenizer(vocab_size)
    build_tiny_llama(tokenizer, hidden=hidden, layers=2, seed=seed).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
