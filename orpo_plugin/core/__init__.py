"""The shared core: what training, export and serving all use, and nothing else.

- formats: preference-dataset formats, row checks, reading JSON/JSONL rows into pairs;
- tokenize: a pair's prompt and answers as token ids, exactly as training makes them;
- chat_template: Jinja chat templates rendered as transformers renders them (for tokenizers that
  are not transformers', such as a GGUF's);
- odds, logprobs: ORPO's odds-ratio math and the log-prob of a target token, for numpy arrays
  and torch tensors alike;
- hookspecs, registry: the pluggy extension points;
- atomic: the one way anything is written;
- files: the names of files one side writes and another reads.

The core imports neither Axolotl nor llama.cpp nor gguf, nor either side of the project; torch
only inside functions handed torch tensors.
"""
