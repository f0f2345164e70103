"""Build a release: quantize -> export -> evaluate -> model card, each in its own directory under
runs/release/<name>/, skipping every stage that is already up to date, then release.json.

    python pipeline/release.py experiment=tiny_fp8
    python pipeline/release.py experiment=cascade2_fp8 release.calib.path=/data/mix.jsonl cluster=slurm

Check a release (or a copy of one) against its manifest: python pipeline/verify.py runs/release/<name>
"""

import hydra
from omegaconf import DictConfig

from hybridquant import logs, parallel, schema
from hybridquant.stages import release

schema.register()


@hydra.main(config_path="../conf", config_name="release", version_base="1.3")
@parallel.fail_fast
def main(cfg: DictConfig) -> None:
    logs.setup()
    release.run(cfg)


if __name__ == "__main__":
    main()
