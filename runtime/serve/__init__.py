"""graphmode's OpenAI-compatible HTTP server: ``python -m runtime.serve``.

One concept per module: ``protocol`` (request/response models), ``preprocess`` (prompts and sampling
parameters), ``completions`` / ``chat`` (the two generation endpoints), ``streaming`` (SSE and client
disconnects), ``errors`` (OpenAI-shaped errors), ``middleware`` (API key, body size), ``metrics``
(Prometheus) and ``app`` (the FastAPI factory). ``__main__`` parses flags, builds the engine and serves.
"""
from runtime.serve.app import create_app
from runtime.serve.settings import ServerSettings

__all__ = ["create_app", "ServerSettings"]
