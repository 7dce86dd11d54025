"""After training: merge, convert to GGUF, quantize, serve and score (later issues)."""
