"""`orpo serve` and `orpo chat` on a GGUF.

app (create_app) wires guard (the ASGI middleware in front), errors (one 4xx style), engine (the
model and its turns) and routes/ (OpenAI-compatible, /v1/score, /health and docs), with api's
pydantic models and limits' defaults; generate is the token loop both the server and chat
(the terminal) use."""
