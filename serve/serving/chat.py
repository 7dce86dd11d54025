"""`orpo chat`: a terminal chat with a GGUF, streaming, with its embedded chat template."""

from __future__ import annotations

import sys

HELP = (
    "commands: /reset (forget the conversation), /system TEXT (set the system prompt), /exit; "
    "Ctrl-C stops a reply, Ctrl-D exits"
)


def chat(
    model_path: str,
    n_ctx: int = 4096,
    threads: int | None = None,
    max_tokens: int = 512,
    temperature: float = 0.7,
    system: str | None = None,
    out=sys.stdout,
) -> None:
    from orpo_plugin.core.tokenize import encode_prompts
    from serve.llama import KVCache, open_gguf
    from serve.serving.generate import Sampling, generate
    from serve.tokenizer import GGUFTokenizer

    llm = open_gguf(model_path, n_ctx, threads)
    tokenizer = GGUFTokenizer(llm)
    history: list[dict] = []
    print(f"chatting with {model_path}; {HELP}", file=out, flush=True)
    try:
        while True:
            try:
                line = input(">>> ")
            except EOFError:
                break
            except KeyboardInterrupt:  # at the prompt: drop the line, keep the session
                print(file=out)
                continue
            command, _, argument = line.strip().partition(" ")
            if command == "/exit":
                break
            if command == "/reset":
                history.clear()
                print("(conversation cleared)", file=out, flush=True)
                continue
            if command == "/system":
                system, history = argument.strip() or None, []
                print(f"(system prompt {'set' if system else 'cleared'}; conversation cleared)", file=out, flush=True)
                continue
            if command in ("/help", "/?"):
                print(HELP, file=out, flush=True)
                continue
            if not line.strip():
                continue
            history.append({"role": "user", "content": line})
            messages = ([{"role": "system", "content": system}] if system else []) + history
            reply = []
            try:
                rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
            except Exception as err:
                history.pop()
                print(f"(the model's chat template cannot render this conversation: {err})", file=out, flush=True)
                continue
            prompt = encode_prompts(tokenizer, [rendered])[0]
            room = llm.n_ctx() - len(prompt)
            if room < 1:
                history.pop()
                print(
                    f"(the conversation is {len(prompt)} tokens, over the context of {llm.n_ctx()}: /reset, or "
                    f"restart with a larger --n-ctx)",
                    file=out,
                    flush=True,
                )
                continue
            try:
                for piece in generate(llm, prompt, min(max_tokens, room), sampling=Sampling(temperature=temperature)):
                    reply.append(piece)
                    print(piece, end="", file=out, flush=True)
            except KeyboardInterrupt:
                KVCache(llm).clear()  # the interrupt may have come mid-decode
                print(" [stopped]", end="", file=out)
            print(file=out, flush=True)
            history.append({"role": "assistant", "content": "".join(reply)})
    finally:
        llm.close()
