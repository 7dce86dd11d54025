"""Names of the files one side of the project writes and another reads, defined once."""

# Training appends one JSON line per logging step to OUTPUT_DIR/LOG_HISTORY; `orpo plot` reads it.
LOG_HISTORY = "orpo_log_history.jsonl"
