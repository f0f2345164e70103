"""Continue prompts with a quantized checkpoint, at any TP/PP/EP (resharded on load).

    torchrun --nproc_per_node=N pipeline/generate.py checkpoint=<quantize run dir> [parallel.tp=2] \
        generation.mode=thinking|instruct|raw generation.do_sample=true
"""

import hydra
from omegaconf import DictConfig

from hybridquant import logs, parallel, schema
from hybridquant.stages import generate

schema.register()


@hydra.main(config_path="../conf", config_name="generate", version_base="1.3")
@parallel.fail_fast
def main(cfg: DictConfig) -> None:
    logs.setup()
    generate.run(cfg)
    parallel.shutdown()


if __name__ == "__main__":
    main()
