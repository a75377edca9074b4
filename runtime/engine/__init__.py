"""The engine layer: requests, scheduling, the KV block manager, detokenizing, and the executors
that reach the workers. ``LLM`` (offline) and ``AsyncEngine`` (server) drive ``EngineCore``."""
