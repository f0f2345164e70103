"""Quantization-aware distillation: the BF16 source teaches the quantized checkpoint (ModelOpt distillation).

    torchrun --nproc_per_node=N pipeline/qad.py checkpoint=runs/quantize/<run> qad.tokens=100000
"""

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from hybridquant import logs, parallel, rundir, schema
from hybridquant.stages import qad

schema.register()


@hydra.main(config_path="../conf", config_name="qad", version_base="1.3")
@parallel.fail_fast
def main(cfg: DictConfig) -> None:
    logs.setup()
    run_dir = HydraConfig.get().runtime.output_dir
    with rundir.removed_if_empty_on_failure(run_dir, stop=cfg.output_root):
        qad.run(cfg, run_dir)
    parallel.shutdown()


if __name__ == "__main__":  # the checkpoint writer re-imports this module in a helper process
    main()
