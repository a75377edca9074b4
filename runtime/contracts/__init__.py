"""What the engine and the worker both read: the engine config, sampling params, requests, the
scheduler's output (what to compute this step) and the runner's output (what was sampled).

These sit below both layers so neither imports the other for a data type (vLLM keeps
``SchedulerOutput`` apart from its scheduler for the same reason).
"""
