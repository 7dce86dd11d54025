"""The limits `orpo serve` puts on requests, defined once: the app's defaults and the CLI's."""

MAX_PAIRS = 64  # pairs per /v1/score request (--max-pairs)
MAX_BODY_BYTES = 1 << 20
MAX_DEPTH = 64  # JSON nesting
READ_TIMEOUT = 30.0  # seconds for a request body to arrive (--read-timeout)
REQUEST_TIMEOUT = 600.0  # seconds a generation may run; it then ends with finish_reason "length" (--request-timeout)
# Host names served by default: a page on another name that resolves here (DNS rebinding) is refused.
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")
