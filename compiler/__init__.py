"""graphmode's compiler: decorate a model class, trace once, split at attention, compile the pieces."""
from compiler.config import CompilationConfig, current_config, default_capture_sizes, use_config
from compiler.counters import counters
from compiler.decorators import RecompileError, record_capture, support_torch_compile

__all__ = ["CompilationConfig", "support_torch_compile", "use_config", "current_config", "counters",
           "default_capture_sizes", "RecompileError", "record_capture"]
