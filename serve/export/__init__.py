"""`orpo merge-and-quantize`: adapter -> merged weights -> GGUF -> K-quants -> checks -> Modelfile.

pipeline (the stages, the report) over checkpoint (reading the base's tensors), merge (LoRA, a
slice at a time), convert (GGUF writing; architectures and rope describe the families), quantize
(llama.cpp's quantizer; the types and their precision order), parity (tensors, tokens and logits
against the merged model), preference (held-out pairs through each file), modelfile (Ollama) and
memory (peak RSS per stage)."""
