"""SmolLM2's tokenizer, rebuilt with `tokenizers` from the vocabulary inside the GGUF file.

Byte-level BPE (GPT-2 style). SmolLM2's pre-tokenizer (llama.cpp calls it "smollm") first splits
every digit on its own, then applies the GPT-2 byte-level regex: "2024" is four tokens.
transformers' GGUF converter builds a plain ByteLevel pre-tokenizer without the digit split; the
vocabulary has no merges that join a digit to anything, so both agree today, but we keep the
split to match the model's own tokenizer.json and llama.cpp.

Building from the GGUF costs ~5 s (parsing 49k tokens and merges); the built tokenizer JSON and
the chat template are cached next to the converted weights.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from engine.cache_files import atomic_write, cache_dir
from engine.models.gguf_loader import cache_key, field_value, gguf_path

_CONTROL_TOKEN = 3  # GGUF token_type of special tokens (<|im_start|>, <|endoftext|>, ...)


@dataclass
class Tokenizer:
    """Text <-> token ids, plus the model's chat template."""

    backend: HFTokenizer
    chat_template: str
    eos_token_id: int  # <|im_end|> (2): the end of an assistant turn
    bos_token_id: int
    special_tokens: dict[str, int] = field(default_factory=dict)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True
                    ) -> str:
        """The chat template rendered like transformers does (sandboxed jinja2, trimmed blocks)."""
        return _compile_template(self.chat_template).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.backend.id_to_token(self.bos_token_id),
            eos_token=self.backend.id_to_token(self.eos_token_id),
        )

    def apply_chat_template(self, messages: list[dict[str, str]],
                            add_generation_prompt: bool = True) -> list[int]:
        return self.encode(self.render_chat(messages, add_generation_prompt))


@functools.lru_cache(maxsize=4)
def _compile_template(source: str) -> Any:
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def build_backend(tokens: list[str], merges: list[str], token_types: list[int]) -> HFTokenizer:
    vocab = {tok: i for i, tok in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    backend = HFTokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False))
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    backend.decoder = decoders.ByteLevel()
    # Specials are matched verbatim before BPE, so "<|im_start|>" in a chat is one token.
    backend.add_special_tokens([
        AddedToken(tok, special=True, normalized=False)
        for tok, kind in zip(tokens, token_types, strict=True) if kind == _CONTROL_TOKEN
    ])
    return backend


def _read_gguf_tokenizer() -> dict[str, Any]:
    import gguf

    reader = gguf.GGUFReader(str(gguf_path()))
    tokens = field_value(reader, "tokenizer.ggml.tokens")
    token_types = field_value(reader, "tokenizer.ggml.token_type")
    backend = build_backend(tokens, field_value(reader, "tokenizer.ggml.merges"), token_types)
    return {
        "backend": backend.to_str(),
        "chat_template": field_value(reader, "tokenizer.chat_template"),
        "eos_token_id": int(field_value(reader, "tokenizer.ggml.eos_token_id")),
        "bos_token_id": int(field_value(reader, "tokenizer.ggml.bos_token_id")),
        "special_tokens": {t: i for i, (t, k) in enumerate(zip(tokens, token_types, strict=True))
                           if k == _CONTROL_TOKEN},
    }


@functools.lru_cache(maxsize=1)
def load_tokenizer() -> Tokenizer:
    """SmolLM2's tokenizer (built once per process; cached on disk across processes)."""
    cached = cache_dir() / f"smollm2-tokenizer-{cache_key(gguf_path())}.json"
    if cached.is_file():
        data = json.loads(cached.read_text(encoding="utf-8"))
    else:
        data = _read_gguf_tokenizer()
        atomic_write(cached, lambda tmp: _write_text(tmp, json.dumps(data)))
    return Tokenizer(
        backend=HFTokenizer.from_str(data["backend"]),
        chat_template=data["chat_template"],
        eos_token_id=data["eos_token_id"],
        bos_token_id=data["bos_token_id"],
        special_tokens=data["special_tokens"],
    )


def _write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
