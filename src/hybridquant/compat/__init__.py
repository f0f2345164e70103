"""Narrow, tested fixes for what the stack lacks on CPU or gets wrong (see each module's docstring)."""


def patch_modelopt() -> None:
    """Apply the ModelOpt fixes every path that builds or restores quantizers needs. Idempotent."""
    from hybridquant.compat import gpu, modelopt_cpu, modelopt_megatron

    modelopt_cpu.apply()
    modelopt_megatron.apply()
    gpu.apply_modelopt()
