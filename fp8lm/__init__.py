"""fp8lm: train large language models in 8-bit floating point (FP8) with PyTorch.

    import fp8lm
    model, optimizer = fp8lm.initialize(model, optimizer, level="O1")

See README.md for the precision levels and the command line (`fp8lm train | compare | inspect`).
"""
from fp8lm.amp import LEVELS, ConversionReport, conversion_report, initialize
from fp8lm.checkpoint import export_weights, load_checkpoint, save_checkpoint
from fp8lm.inspection import InspectReport, inspect
from fp8lm.memory import MemoryReport, memory_report
from fp8lm.nn import Float8Linear
from fp8lm.scaling import RECIPES, Recipe
from fp8lm.tensor import ScaledTensor, is_scaled, storage_bytes

__all__ = ["initialize", "conversion_report", "ConversionReport", "LEVELS", "Recipe", "RECIPES", "Float8Linear",
           "inspect", "InspectReport", "memory_report", "MemoryReport", "save_checkpoint", "load_checkpoint",
           "export_weights", "ScaledTensor", "is_scaled", "storage_bytes"]
__version__ = "0.1.0"
