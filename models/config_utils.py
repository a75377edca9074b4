"""Reading the few config facts our models need, across transformers versions."""
from __future__ import annotations

from typing import Any


def rope_settings(config: Any) -> tuple[float, dict | None]:
    """(theta, scaling dict or None) from either ``rope_parameters`` (v5) or ``rope_scaling``/``rope_theta``."""
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and "rope_theta" in params:
        kind = params.get("rope_type", params.get("type", "default"))
        return float(params["rope_theta"]), (None if kind == "default" else dict(params))
    theta = float(getattr(config, "rope_theta", 10000.0))
    scaling = getattr(config, "rope_scaling", None)
    return theta, (dict(scaling) if scaling else None)


def head_dim(config: Any) -> int:
    value = getattr(config, "head_dim", None)
    return int(value) if value else config.hidden_size // config.num_attention_heads


def layer_sliding_window(config: Any, layer_idx: int) -> int | None:
    """The sliding window of one layer, or None for full attention."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return window if layer_types[layer_idx] == "sliding_attention" else None
    if getattr(config, "use_sliding_window", False) and window:
        return window if layer_idx >= getattr(config, "max_window_layers", 0) else None
    return None
