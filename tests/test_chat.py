"""`orpo chat` driven through a pseudo-terminal."""

from __future__ import annotations

import pexpect
import tiny
from test_cli import BIN, _env

from serve.export.convert import convert


def _spawn(model, *args):
    child = pexpect.spawn(
        str(BIN / "orpo"), ["chat", str(model), "--n-threads", "2", *args], env=_env(), encoding="utf-8", timeout=120
    )
    child.expect("chatting with")
    child.expect_exact(">>> ")
    return child


def test_chat_answers_with_the_trained_model_and_exits_cleanly(trained_tiny):
    child = _spawn(trained_tiny["gguf"] / "model-q8_0.gguf", "--temperature", "0", "--max-tokens", "24")
    child.sendline("Convert 12 km to m.")
    child.expect_exact("Convert 12 km to m.")  # the terminal's echo
    child.expect(r"\S+.*\r\n")  # the streamed reply, then the newline after it
    reply = child.after.strip()
    child.expect_exact(">>> ")
    assert reply and ">>>" not in reply
    child.sendline("/system Answer with the number only.")
    child.expect_exact("(system prompt set; conversation cleared)")
    child.sendline("/reset")
    child.expect_exact("(conversation cleared)")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_ctrl_c_stops_a_reply_and_keeps_the_session(tmp_path):
    """A random model answering greedily never emits EOS within 3000 tokens (about 9 s here):
    Ctrl-C is what ends the reply."""
    tiny.build_model(
        "llama",
        tmp_path / "m",
        tokenizer=tiny.build_tokenizer(None),
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
    )
    model = convert(tmp_path / "m", tmp_path / "m.gguf", "f16")
    child = _spawn(model, "--temperature", "0", "--max-tokens", "3000")
    child.sendline("Tell me a long story.")
    child.expect_exact("Tell me a long story.\r\n")
    child.expect(r"\S")  # the reply has started
    child.sendintr()
    child.expect_exact("[stopped]", timeout=30)
    child.expect_exact(">>> ")
    child.sendintr()  # Ctrl-C at the prompt: a fresh prompt, not an exit
    child.expect_exact(">>> ")
    child.sendeof()  # Ctrl-D exits
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0 and "Traceback" not in child.before
