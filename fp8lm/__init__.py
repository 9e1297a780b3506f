"""fp8lm: train large language models in 8-bit floating point (FP8) with PyTorch.

    import fp8lm
    model, optimizer = fp8lm.initialize(model, optimizer, level="O1")

See README.md for the precision levels and the command line (`fp8lm train | compare`).
"""
from fp8lm.amp import LEVELS, ConversionReport, conversion_report, initialize
from fp8lm.nn import Float8Linear
from fp8lm.scaling import RECIPES, Recipe

__all__ = ["initialize", "conversion_report", "ConversionReport", "LEVELS", "Recipe", "RECIPES", "Float8Linear"]
__version__ = "0.1.0"
