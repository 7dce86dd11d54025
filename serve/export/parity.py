"""Does each GGUF behave like the merged model? Three checks, each sized to run on an 8B export:

- tokens: llama.cpp tokenizes sample texts (chat renderings and plain text) exactly as the model's
  tokenizer does (the vocabulary alone is loaded);
- tensors: every tensor of every file against the merged weights, as a relative RMS error, read a
  slice at a time. Files we write are checked whole as they are written; files llama.cpp quantized
  are compared with the f16/bf16 file they came from (whose own error is reported beside them), on
  one slice of rows in SAMPLE_EVERY, spread over each tensor;
- logits: next-token log-probs of the merged model (transformers, fp32) against each GGUF on the
  sample texts and on a sequence long enough to cross a scaled RoPE's original context. The merged
  model is built in memory, so this runs only up to LOGITS_LIMIT bytes of fp32 weights (the small
  models of tests and the demo); the report says when it was left out.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

from orpo_plugin.core.logprobs import log_softmax
from serve.export.checkpoint import parameters

SAMPLE_MESSAGES = [
    [{"role": "user", "content": "What is 12 + 30?"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Name a prime number above 10."}],
]
SAMPLE_TEXTS = ["Plain text: digits 2024, punctuation!? and ünïcödé.", "  leading spaces\nand a newline"]
GiB = 1 << 30
LOGITS_LIMIT = 2 * GiB  # fp32 bytes of the merged model built for the logits check

LONG_TOKENS = 1536  # past the original context of a scaled RoPE in the tests, within every model's
WINDOW = 128
# Mean next-token KL a GGUF of this type may show over the long sequence. A GGUF that computes
# something else than the model is orders of magnitude above (Llama 3's RoPE scaling left out:
# 0.05 for f32, growing with position). K-quants are reported, not judged: their error depends on
# the model.
LONG_KL_BOUND = {"f32": 1e-4, "f16": 1e-3, "bf16": 1e-3, "q8_0": 2e-2}
# Relative RMS error a tensor of a file of this type may show against the merged weights (f16 rounds
# at 2^-11, bf16 at 2^-8, q8_0 to 1/127 of each block's largest value). K-quants: reported.
TENSOR_BOUND = {"f32": 1e-6, "f16": 1e-3, "bf16": 8e-3, "q8_0": 2e-2}


def sample_texts(tokenizer) -> list[str]:
    """Chat renderings the model's template accepts (Mistral v0.1's refuses a system turn), and
    plain texts."""
    from jinja2 import TemplateError

    chats = []
    for messages in SAMPLE_MESSAGES if tokenizer.chat_template else []:
        try:
            chats.append(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
        except TemplateError:
            continue
    return chats + SAMPLE_TEXTS


def same_tokens(path: Path, tokenizer, texts: list[str]) -> bool:
    """llama.cpp (in a child process: serve.export.isolated) tokenizes the texts as the tokenizer does."""
    from serve.export.isolated import Child

    with Child(path) as child:
        found = child.call("tokenizing", str(path), texts)
    return all(ids == tokenizer(t, add_special_tokens=True)["input_ids"] for ids, t in zip(found, texts))


# -- tensors -------------------------------------------------------------------------------------
def tensor_summary(errors: dict[str, list[float]], quant: str, reference: str) -> dict:
    """{gguf tensor: [squared error, squared values]} -> the file's worst and mean relative RMS."""
    rel = {name: float(np.sqrt(err / ref)) if ref else float(err > 0) for name, (err, ref) in errors.items()}
    worst = max(rel, key=rel.get)
    bound = TENSOR_BOUND.get(quant)
    return {
        "checked": len(rel),
        "reference": reference,
        "worst": worst,
        "worst_rel_rms": rel[worst],
        "mean_rel_rms": float(np.mean(list(rel.values()))),
        "bound": bound,
        "ok": bound is None or rel[worst] <= bound,
    }


def _tensors(path: Path) -> dict:
    return {t.name: t for t in gguf.GGUFReader(str(path)).tensors}


def _rows(path: Path, tensor, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of a GGUF tensor, dequantized, with a plain read (no mmap: memory stays
    bounded while a whole file streams through)."""
    row_elements = int(tensor.shape[0])  # GGUFReader gives ggml's order: the row length first
    rows = tensor.n_elements // row_elements
    row_bytes = tensor.n_bytes // rows
    raw = np.fromfile(
        path, dtype=np.uint8, count=(stop - start) * row_bytes, offset=int(tensor.data_offset) + start * row_bytes
    ).reshape(stop - start, row_bytes)
    kind = gguf.GGMLQuantizationType(tensor.tensor_type)
    if kind == gguf.GGMLQuantizationType.F32:
        return raw.view(np.float32)
    if kind == gguf.GGMLQuantizationType.F16:
        return raw.view(np.float16).astype(np.float32)
    return gguf.quants.dequantize(raw, kind)


SAMPLE_EVERY = 4  # the K-quant check reads one slice of rows in four, spread over each tensor


def compare_files(path: Path, reference: Path, bar=None, every: int = SAMPLE_EVERY) -> dict[str, list[float]]:
    """Every tensor of `path` against the same tensor of `reference`, in slices of about 2M values:
    the first and then one in `every` (all of a small tensor)."""
    ours, theirs = _tensors(path), _tensors(reference)
    if bar is not None:
        bar.reset(total=len(ours))
    errors = {}
    for name, tensor in ours.items():
        rows = tensor.n_elements // int(tensor.shape[0])
        step = max(1, (1 << 21) // int(tensor.shape[0]))
        err = ref = 0.0
        for start in range(0, rows, step * every):
            stop = min(rows, start + step)
            want = _rows(reference, theirs[name], start, stop).ravel()
            diff = _rows(path, tensor, start, stop).ravel() - want
            err += float(np.dot(diff, diff))
            ref += float(np.dot(want, want))
        errors[name] = [err, ref]
        if bar is not None:
            bar.update(1)
    return errors


# -- logits --------------------------------------------------------------------------------------
def logits_left_out(source) -> str | None:
    """Why the end-to-end logits check cannot run on this model here, or None when it can."""
    import importlib.util

    size = parameters(source) * 4
    if size > LOGITS_LIMIT:
        return (
            f"the merged model is {size / GiB:.1f} GiB in fp32; the end-to-end logits check builds it "
            f"in memory and runs up to {LOGITS_LIMIT / GiB:.0f} GiB"
        )
    if importlib.util.find_spec("torch") is None:
        return "torch is not installed (orpo-plugin[serve] alone); install torch to run it"
    return None


def reference_model(source):
    """The merged model in transformers, fp32, its weights read from the (merged) checkpoint a slice
    of rows at a time into parameters left uninitialised: memory holds the model once, not also a
    random initialisation and a state dict."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    config = {k: v for k, v in source.config.items() if k not in ("torch_dtype", "dtype", "transformers_version")}
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config), dtype=torch.float32)
    state = model.state_dict()
    names = set(source.names())
    missing, unexpected = sorted(set(state) - names), sorted(names - set(state))
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(
            f"the reference model does not take the checkpoint's tensors: missing {missing}, unexpected {unexpected}"
        )
    with torch.no_grad():
        for name in names:
            target = state[name]  # shares its parameter's memory
            step = max(1, (16 << 20) // (4 * target[0].numel()))  # rows of about 16 MiB
            for start in range(0, target.shape[0], step):
                rows = target[start : start + step]
                rows.copy_(torch.from_numpy(source.rows(name, start, start + step)).reshape(rows.shape))
    if missing:
        model.tie_weights()
    return model.eval()


def _long_ids(tokenizer, config_context: int) -> list[int]:
    """A deterministic sequence of ordinary tokens, as long as the model allows up to LONG_TOKENS."""
    special = set(tokenizer.all_special_ids)
    ordinary = [i for i in range(len(tokenizer)) if i not in special]
    n = min(LONG_TOKENS, config_context)
    return [ordinary[i] for i in np.random.default_rng(0).integers(0, len(ordinary), n)]


def _long_check(kl: np.ndarray, quant: str) -> dict:
    """Mean KL over the sequence and per WINDOW positions (the worst window and the first)."""
    means = [float(kl[i : i + WINDOW].mean()) for i in range(0, len(kl), WINDOW)]
    worst = int(np.argmax(means))
    bound = LONG_KL_BOUND.get(quant)
    return {
        "tokens": len(kl),
        "mean_kl": float(kl.mean()),
        "bound": bound,
        "first_window_kl": means[0],
        "worst_window": [worst * WINDOW, min(len(kl), (worst + 1) * WINDOW)],
        "worst_window_kl": means[worst],
        "ok": bound is None or float(kl.mean()) <= bound,
    }


CHUNK_BYTES = 16 << 20  # float64 log-probs of one window of rows, per model, held at a time


def chunk_rows(vocab: int) -> int:
    """Rows of full-vocabulary log-probs in one window of CHUNK_BYTES (at least one)."""
    return max(1, CHUNK_BYTES // (8 * vocab))


class Reference:
    """The merged model's next-token log-probs of one sequence, a window of rows at a time: the
    decoder runs once (hidden states are small), the head and log-softmax per window."""

    def __init__(self, hf, ids: list[int]):
        import torch

        self.ids = ids
        with torch.no_grad():
            self.hidden = hf.get_decoder()(input_ids=torch.tensor([ids])).last_hidden_state[0]
        self.head = hf.get_output_embeddings()
        self.cap = getattr(hf.config.get_text_config(), "final_logit_softcapping", None)

    def window(self, start: int, stop: int) -> np.ndarray:
        import torch

        with torch.no_grad():
            logits = self.head(self.hidden[start:stop]).double()
            if self.cap:  # as the model's own forward does (Gemma 2)
                logits = torch.tanh(logits / self.cap) * self.cap
        return log_softmax(logits).numpy()


def _compare(child, reference: Reference, step: int) -> tuple[np.ndarray, float]:
    """Per-position KL(merged || GGUF) and the largest log-prob difference, window by window."""
    child.call("clearing")
    kls, max_abs = [], 0.0
    for start in range(0, len(reference.ids), step):
        stop = min(start + step, len(reference.ids))
        want = reference.window(start, stop)
        ours = log_softmax(child.call("decoding", reference.ids[start:stop]).astype(np.float64))
        max_abs = max(max_abs, float(np.abs(ours - want).max()))
        kls.append((np.exp(want) * (want - ours)).sum(-1))
    return np.concatenate(kls), max_abs


def logits(source, tokenizer, texts: list[str], gguf_paths: dict[str, Path], threads: int, hf=None) -> dict:
    """Next-token log-probs of each GGUF (decoded in a child process) against the merged model (hf:
    it, already built), window by window: {quant: {max_abs_logprob_diff, mean_kl, long}}, or
    {quant: {error}} where llama.cpp stopped on the file."""
    from serve.export.isolated import Child, LlamaAbort

    model = hf if hf is not None else reference_model(source)
    long_ids = _long_ids(tokenizer, model.config.get_text_config().max_position_embeddings)
    references = [Reference(model, tokenizer(t, add_special_tokens=True)["input_ids"]) for t in texts]
    references.append(Reference(model, long_ids))
    step = min(512, chunk_rows(model.get_output_embeddings().weight.shape[0]))
    del model  # built here: its decoder has done its work (the references keep the head) before llama.cpp runs
    out = {}
    for name, path in gguf_paths.items():
        try:
            with Child(path) as child:
                child.call("loading", str(path), max(512, len(long_ids)), threads, step)
                found = [_compare(child, reference, step) for reference in references]
        except LlamaAbort as err:
            out[name] = {"error": str(err)}
            continue
        short = found[:-1]
        out[name] = {
            "max_abs_logprob_diff": max((m for _, m in short), default=0.0),
            "mean_kl": float(np.mean([kl.mean() for kl, _ in short])) if short else 0.0,
            "long": _long_check(found[-1][0], name),
        }
    return out
