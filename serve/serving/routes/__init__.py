"""One router per surface of `orpo serve`: the OpenAI-compatible routes, /v1/score, and
/health with the API docs."""
