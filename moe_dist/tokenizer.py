"""Tokenizers for preparing and reading data: any local Hugging Face ``tokenizer.json`` through the
``tokenizers`` library, or byte-level (UTF-8 bytes, vocab 256, no EOS). Never a hub download. No torch here,
so preparation workers start fast.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

BYTE_LEVEL = "byte-level"
BYTE_VOCAB = 256
# Tried in order when neither --eos-token nor tokenizer_config.json names the end-of-document token.
COMMON_EOS = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|end|>")


class ByteTokenizer:
    """UTF-8 bytes as token ids; documents are delimited by the shard's document index, not by a token."""

    name = BYTE_LEVEL
    vocab_size = BYTE_VOCAB
    eos_id: int | None = None
    sha256: str | None = None
    json_text: str | None = None

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [list(text.encode("utf-8")) for text in texts]

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")

    def token_text(self, token_id: int) -> str:
        return repr(bytes([token_id]))[2:-1]


class HFTokenizer:
    """A local ``tokenizer.json`` (or a directory holding one, with an optional tokenizer_config.json)."""

    def __init__(self, spec: str, *, eos_token: str | None = None):
        from tokenizers import Tokenizer

        path = Path(spec).expanduser()
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise ValueError(
                f"--tokenizer={spec!r}: no tokenizer.json there (a local file or directory is needed; "
                "nothing is downloaded)"
            )
        self.json_text = file.read_text(encoding="utf-8")
        try:
            self.tokenizer = Tokenizer.from_str(self.json_text)
        except Exception as err:  # the tokenizers library raises its own Exception type
            raise ValueError(f"--tokenizer={spec!r}: {file} is not a tokenizers JSON file ({err})") from err
        self.name = str(file.resolve())
        self.sha256 = hashlib.sha256(self.json_text.encode("utf-8")).hexdigest()
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)
        self.eos_id = self._eos_id(file, eos_token, spec)

    def _eos_id(self, file: Path, eos_token: str | None, spec: str) -> int:
        if eos_token is None:
            config = file.with_name("tokenizer_config.json")
            if config.is_file():
                eos = json.loads(config.read_text()).get("eos_token")
                eos_token = eos.get("content") if isinstance(eos, dict) else eos
        candidates = [eos_token] if eos_token is not None else list(COMMON_EOS)
        for token in candidates:
            token_id = self.tokenizer.token_to_id(token)
            if token_id is not None:
                return token_id
        if eos_token is not None:
            raise ValueError(f"--eos-token={eos_token!r}: not in the vocabulary of --tokenizer={spec!r}")
        raise ValueError(
            f"--tokenizer={spec!r}: no end-of-document token found (none of {', '.join(COMMON_EOS)}, and no "
            "eos_token in tokenizer_config.json); name it with --eos-token"
        )

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def token_text(self, token_id: int) -> str:
        text = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return text if text and "\ufffd" not in text else (self.tokenizer.id_to_token(token_id) or "?")


def load_tokenizer(spec: str | None, *, eos_token: str | None = None) -> ByteTokenizer | HFTokenizer:
    """Byte-level for None / "byte-level", else a local tokenizer.json or a directory holding one."""
    if spec is None or spec == BYTE_LEVEL:
        if eos_token is not None:
            raise ValueError(f"--eos-token={eos_token!r}: byte-level tokenization has no special tokens")
        return ByteTokenizer()
    return HFTokenizer(spec, eos_token=eos_token)
