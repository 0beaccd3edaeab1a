"""The tokenizer as GGUF metadata (`tokenizer.ggml.*`): tokens, token types, merges, special
ids and the chat template, which is all llama.cpp and transformers read from the file.

Byte-level BPE tokenizers are written as llama.cpp's `gpt2` model with the name of their
pre-tokenizer split; sentencepiece-style BPE (Metaspace, `<0x..>` byte tokens) as `llama`, with
merges ranked by score. Embedding rows beyond the tokenizer (padded vocabularies) become unused
`[PADn]` tokens.
"""

from __future__ import annotations

import json

from still.errors import StillError


def write_tokenizer(writer, tokenizer, vocab_rows: int) -> None:
    import gguf

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise StillError("GGUF export needs a fast (tokenizers) tokenizer")
    spec = json.loads(backend.to_str())
    if spec["model"]["type"] != "BPE":
        raise StillError(
            f"GGUF export: {spec['model']['type']} tokenizers are not supported (BPE only)"
        )
    byte_level = "ByteLevel" in json.dumps(spec.get("pre_tokenizer")) or "ByteLevel" in json.dumps(
        spec.get("decoder")
    )
    by_id = {index: token for token, index in backend.get_vocab(with_added_tokens=True).items()}
    if max(by_id) >= vocab_rows:
        raise StillError(
            f"tokenizer has ids up to {max(by_id)} but the model only {vocab_rows} embedding rows"
        )
    added = {entry["id"]: entry for entry in spec.get("added_tokens", [])}
    tokens, types = [], []
    for index in range(vocab_rows):
        token = by_id.get(index)
        if token is None:  # embedding rows beyond the tokenizer (padded vocab)
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(token)
        types.append(_token_type(token, added.get(index), tokenizer, byte_level))
    writer.add_tokenizer_model("gpt2" if byte_level else "llama")
    pre = _pre_tokenizer_name(spec.get("pre_tokenizer")) if byte_level else "default"
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([int(t) for t in types])
    if not byte_level:  # sentencepiece-style: llama.cpp ranks merges by score
        writer.add_token_scores([-float(index) for index in range(vocab_rows)])
    merges = spec["model"].get("merges") or []
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    for token_id, add in (
        (tokenizer.bos_token_id, writer.add_bos_token_id),
        (tokenizer.eos_token_id, writer.add_eos_token_id),
        (tokenizer.unk_token_id, writer.add_unk_token_id),
        (tokenizer.pad_token_id, writer.add_pad_token_id),
    ):
        if token_id is not None:
            add(token_id)
    probe = tokenizer("a")["input_ids"]
    writer.add_add_bos_token(bool(probe) and probe[0] == tokenizer.bos_token_id)
    writer.add_add_eos_token(bool(probe) and len(probe) > 1 and probe[-1] == tokenizer.eos_token_id)
    writer.add_add_space_prefix(False)
    if isinstance(getattr(tokenizer, "chat_template", None), str):
        writer.add_chat_template(tokenizer.chat_template)


def _token_type(token: str, added: dict | None, tokenizer, byte_level: bool):
    import gguf

    if added is not None:
        return gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    if token == tokenizer.unk_token:
        return gguf.TokenType.UNKNOWN
    if not byte_level and len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
        return gguf.TokenType.BYTE
    return gguf.TokenType.NORMAL


def _pre_tokenizer_name(pre_tokenizer: dict | None) -> str:
    """llama.cpp's name for how text is split before BPE (`gpt-2` for plain ByteLevel)."""
    text = json.dumps(pre_tokenizer)
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS
    except ImportError:
        GGUF_PRE_TOKENIZER_SPLITS = {}
    for name, regex in GGUF_PRE_TOKENIZER_SPLITS.items():
        if json.dumps(regex)[1:-1] in text:
            return name
    if '"Digits"' in text and '"individual_digits": true' in text:
        return "smollm"
    return "gpt-2"
