"""Tokenizers: a light wrapper over the `tokenizers` library for checkpoints
that ship tokenizer.json, transformers' AutoTokenizer for the rest.

The wrapper answers the part of the transformers tokenizer API that tokenmill
uses (calling, encode, decode, apply_chat_template, special token ids) at a
fraction of the import cost; a test checks it against AutoTokenizer.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from types import SimpleNamespace

from tokenmill.errors import ModelLoadError


def _token_text(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


class FastTokenizer:
    def __init__(self, path: str):
        from tokenizers import Tokenizer

        self.backend = Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
        cfg = {}
        cfg_file = os.path.join(path, "tokenizer_config.json")
        if os.path.exists(cfg_file):
            with open(cfg_file) as f:
                cfg = json.load(f)
        self.init_kwargs = cfg
        self.chat_template = cfg.get("chat_template")
        template_file = os.path.join(path, "chat_template.jinja")
        if self.chat_template is None and os.path.exists(template_file):
            with open(template_file) as f:
                self.chat_template = f.read()
        self.clean_up_tokenization_spaces = bool(cfg.get("clean_up_tokenization_spaces", False))
        for name in ("bos", "eos", "pad", "unk"):
            text = _token_text(cfg.get(f"{name}_token"))
            setattr(self, f"{name}_token", text)
            setattr(
                self,
                f"{name}_token_id",
                self.backend.token_to_id(text) if text is not None else None,
            )
        self.add_bos_token = cfg.get("add_bos_token")

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        if (
            add_special_tokens
            and self.add_bos_token
            and self.bos_token_id is not None
            and ids[:1] != [self.bos_token_id]
        ):
            ids = [self.bos_token_id, *ids]
        return ids

    def __call__(self, text: str, add_special_tokens: bool = True):
        return SimpleNamespace(input_ids=self.encode(text, add_special_tokens))

    def decode(
        self,
        ids,
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
    ) -> str:
        text = self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        clean = (
            self.clean_up_tokenization_spaces
            if clean_up_tokenization_spaces is None
            else clean_up_tokenization_spaces
        )
        if clean:
            for a, b in (
                (" .", "."),
                (" ?", "?"),
                (" !", "!"),
                (" ,", ","),
                (" ' ", "'"),
                (" n't", "n't"),
                (" 'm", "'m"),
                (" 's", "'s"),
                (" 've", "'ve"),
                (" 're", "'re"),
            ):
                text = text.replace(a, b)
        return text

    def convert_ids_to_tokens(self, ids):
        return [self.backend.id_to_token(i) for i in ids]

    def apply_chat_template(
        self, messages, chat_template=None, add_generation_prompt=False, tokenize=True, **kwargs
    ):
        template = chat_template or self.chat_template
        if template is None:
            raise ValueError(
                "this model has no chat template: pass one as chat_template (LLM.chat, "
                "or the request's chat_template field) or with tokenmill serve --chat-template"
            )
        text = _compile_template(template).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
            **kwargs,
        )
        return self.encode(text, add_special_tokens=False) if tokenize else text


_templates: dict[str, object] = {}


def _compile_template(source: str):
    template = _templates.get(source)
    if template is None:
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise ValueError(message)

        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.filters["tojson"] = lambda v, indent=None: json.dumps(
            v, ensure_ascii=False, indent=indent
        )
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        template = env.from_string(source)
        _templates[source] = template
    return template


def load_tokenizer(path: str, trust_remote_code: bool = False):
    """The fast wrapper when tokenizer.json exists, else transformers' AutoTokenizer."""
    if os.path.exists(os.path.join(path, "tokenizer.json")) and not trust_remote_code:
        try:
            return FastTokenizer(path)
        except Exception:  # noqa: BLE001  (anything unusual goes to transformers)
            pass
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise ModelLoadError(f"cannot load a tokenizer from {path}: {e}") from e
