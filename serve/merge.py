"""Merge a LoRA adapter into its base model, in full precision (never into a 4/8-bit base)."""

from __future__ import annotations

import json
from pathlib import Path

from orpo_plugin.core.atomic import atomic_path


class MergeError(ValueError):
    pass


def _untie_adapted_embeddings(model) -> None:
    """With tied embeddings, an adapter on one side (lm_head or embed_tokens) trained a model whose
    two sides differ; merging into the shared matrix would move both. Give the output side its
    own copy first, and save the model untied."""
    import torch

    base = model.get_base_model()
    config = base.config.get_text_config()
    inner, outer = base.get_input_embeddings(), base.get_output_embeddings()
    adapted = [m for m in (inner, outer) if hasattr(m, "base_layer") or hasattr(m, "modules_to_save")]
    if outer is None or not getattr(config, "tie_word_embeddings", False) or not adapted:
        return
    layer = getattr(outer, "base_layer", outer)
    if hasattr(layer, "weight") and layer.weight is getattr(inner, "base_layer", inner).weight:
        layer.weight = torch.nn.Parameter(layer.weight.detach().clone())
    config.tie_word_embeddings = base.config.tie_word_embeddings = False


def merge_adapter(base: str | Path, adapter: str | Path, out_dir: str | Path, dtype: str = "float32") -> Path:
    """Load base unquantized, apply the adapter, merge, save to out_dir with the tokenizer the
    adapter was trained with (Axolotl saves it beside the adapter), atomically."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter, out_dir = Path(adapter), Path(out_dir)
    config_path = adapter / "adapter_config.json"
    if not config_path.is_file():
        raise MergeError(f"{adapter}: no adapter_config.json; pass the directory `axolotl train` wrote "
                         f"(its output_dir), or omit the adapter for a full fine-tune")
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=getattr(torch, dtype))
    try:
        model = PeftModel.from_pretrained(model, str(adapter))
    except (RuntimeError, ValueError, KeyError) as err:
        declared = json.loads(config_path.read_text()).get("base_model_name_or_path")
        raise MergeError(f"{adapter} does not fit base model {base} (the adapter names {declared!r}): "
                         f"{str(err).splitlines()[0]}") from None
    _untie_adapted_embeddings(model)
    merged = model.merge_and_unload(progressbar=True)
    tokenizer_dir = adapter if (adapter / "tokenizer_config.json").is_file() else Path(base)
    with atomic_path(out_dir) as tmp:
        merged.save_pretrained(str(tmp))
        AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(str(tmp))
    return out_dir
