"""`orpo chat`: a terminal chat with a GGUF, streaming, with its embedded chat template."""

from __future__ import annotations

import sys

HELP = "commands: /reset (forget the conversation), /system TEXT (set the system prompt), /exit; " \
       "Ctrl-C stops a reply, Ctrl-D exits"


def chat(model_path: str, n_ctx: int = 4096, threads: int | None = None, max_tokens: int = 512,
         temperature: float = 0.7, system: str | None = None, out=sys.stdout) -> None:
    from serve.llama import open_gguf

    llm = open_gguf(model_path, n_ctx, threads)
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
                for chunk in llm.create_chat_completion(messages, stream=True, max_tokens=max_tokens,
                                                        temperature=temperature):
                    piece = chunk["choices"][0]["delta"].get("content") or ""
                    reply.append(piece)
                    print(piece, end="", file=out, flush=True)
            except KeyboardInterrupt:
                print(" [stopped]", end="", file=out)
            print(file=out, flush=True)
            history.append({"role": "assistant", "content": "".join(reply)})
    finally:
        llm.close()
