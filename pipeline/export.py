"""Export a quantized checkpoint for deployment: ModelOpt-HF (vLLM, SGLang), GGUF (llama.cpp, Ollama)
or compressed-tensors (vLLM).

    torchrun --nproc_per_node=N pipeline/export.py checkpoint=<quantize run dir> output_dir=<dir> \
        [export.format=modelopt|gguf|compressed_tensors]

Runs at the checkpoint's calibration layout unless parallel.* says otherwise.
"""

import hydra
from omegaconf import DictConfig

from hybridquant import logs, parallel, schema
from hybridquant.stages import export

schema.register()


@hydra.main(config_path="../conf", config_name="export", version_base="1.3")
@parallel.fail_fast
def main(cfg: DictConfig) -> None:
    logs.setup()
    export.run(cfg)
    parallel.shutdown()


if __name__ == "__main__":
    main()
