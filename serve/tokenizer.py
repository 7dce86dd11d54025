"""A GGUF's own tokenizer with the small surface of an HF tokenizer that the core's tokenization
uses (orpo_plugin.core.tokenize): scoring, `orpo chat` and `orpo serve` tokenize through it as
training tokenized through transformers. llama.cpp tokenizes; the chat template embedded in the
GGUF is rendered by core.chat_template, as transformers renders it. Public llama-cpp-python API
only."""

from __future__ import annotations

from orpo_plugin.core.chat_template import render as render_template


class GGUFTokenizer:
    def __init__(self, llm):
        self.llm = llm
        self.eos_token_id = llm.token_eos()
        # As HF: a BOS only where the tokenizer adds one. A GGUF that says no (Qwen2) still names
        # one, and llama.cpp falls back to token 11 where it names none.
        declared = "tokenizer.ggml.bos_token_id" in llm.metadata
        adds_bos = llm.metadata.get("tokenizer.ggml.add_bos_token") == "true"
        self.bos_token_id = llm.token_bos() if declared and adds_bos else None
        self.eos_token = self._text(self.eos_token_id)
        self.bos_token = self._text(llm.token_bos()) if declared else None  # for templates that write it
        self.chat_template = llm.metadata.get("tokenizer.chat_template")

    def _text(self, token_id: int) -> str:
        return self.llm.detokenize([token_id], special=True).decode("utf-8", errors="replace")

    def __call__(self, texts, add_special_tokens: bool = True):
        one = isinstance(texts, str)
        # llama.cpp adds BOS only where the GGUF says the model wants it (tokenizer.ggml.add_bos_token).
        ids = [
            self.llm.tokenize(t.encode(), add_bos=add_special_tokens, special=True) for t in ([texts] if one else texts)
        ]
        return {"input_ids": ids[0] if one else ids}

    def apply_chat_template(
        self, messages, chat_template=None, tokenize=False, add_generation_prompt=False, tools=None
    ):
        return render_template(
            chat_template or self.chat_template,
            messages,
            add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token,
            tools=tools,
        )
