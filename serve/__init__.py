"""After training: two rooms over a shared floor.

- export/: `orpo merge-and-quantize` — merge the LoRA, write GGUF, quantize, check the files
  against the merged model, write the Ollama Modelfile (pipeline.py runs the stages).
- serving/: `orpo serve` (a FastAPI app: guard, engine, one router per surface) and `orpo chat`,
  both generating with generate.py.
- shared by both: scoring.py (chosen vs rejected, as training computed it: the export's
  preference check, `orpo score` and /v1/score), tokenizer.py (a GGUF's tokenizer with an HF
  tokenizer's surface), llama.py (everything used of llama-cpp-python beyond its public API).
- cli.py (the `orpo` command) and plot.py (`orpo plot`, training curves).

Nothing here imports Axolotl at import time, nor torch on the GGUF paths; the project's core
(orpo_plugin.core) is the only part of the training side used.
"""
