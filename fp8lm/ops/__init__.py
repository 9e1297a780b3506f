"""FP8 kernels: the GEMM (``torch._scaled_mm``) behind one contract-checked entry point."""
from fp8lm.ops.gemm import ScaledMMContractError, check_scaled_mm_args, fp8_gemm_supported, fp8_mm

__all__ = ["fp8_mm", "check_scaled_mm_args", "fp8_gemm_supported", "ScaledMMContractError"]
