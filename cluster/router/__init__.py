"""The OpenAI-compatible router: HTTP API, auth and limits, picking workers, streaming."""
