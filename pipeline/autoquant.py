"""Choose NVFP4 / FP8 / BF16 per layer under a budget (ModelOpt AutoQuantize), then quantize with it.

    torchrun --nproc_per_node=N pipeline/autoquant.py +quant=mamba_moe_nvfp4_aggressive autoquant.effective_bits=5.5
"""

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from hybridquant import logs, parallel, rundir, schema
from hybridquant.stages import autoquant

schema.register()


@hydra.main(config_path="../conf", config_name="autoquant", version_base="1.3")
@parallel.fail_fast
def main(cfg: DictConfig) -> None:
    logs.setup()
    run_dir = HydraConfig.get().runtime.output_dir
    with rundir.removed_if_empty_on_failure(run_dir, stop=cfg.output_root):
        autoquant.run(cfg, run_dir)
    parallel.shutdown()


if __name__ == "__main__":  # the checkpoint writer re-imports this module in a helper process
    main()
