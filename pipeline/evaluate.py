"""Evaluate quantized checkpoints against their unquantized reference on held-out text.

    torchrun --nproc_per_node=N pipeline/evaluate.py checkpoints=[<quantize run dir>,<export dir>,...] \
        [model=tiny_trained] [parallel.pp=2] [evaluation.modes=[fake_quant,weight_only]]
"""

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from hybridquant import logs, parallel, rundir, schema
from hybridquant.stages import evaluate

schema.register()


@hydra.main(config_path="../conf", config_name="evaluate", version_base="1.3")
@parallel.fail_fast
def main(cfg: DictConfig) -> None:
    logs.setup()
    run_dir = HydraConfig.get().runtime.output_dir
    with rundir.removed_if_empty_on_failure(run_dir, stop=cfg.output_root):
        evaluate.run(cfg, run_dir)
    parallel.shutdown()


if __name__ == "__main__":
    main()
