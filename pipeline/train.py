"""Train the tiny model briefly on the shipped text (once; cached), and print where it is and its losses.

    python pipeline/train.py                      # model=tiny_trained
    python pipeline/train.py model.train.steps=80 # another training run, cached under its own key
"""

import hydra
from omegaconf import DictConfig, OmegaConf

from hybridquant import logs, parallel, schema, source, train
from hybridquant.errors import UserError

schema.register()


@hydra.main(config_path="../conf", config_name="train", version_base="1.3")
@parallel.fail_fast
def main(cfg: DictConfig) -> None:
    logs.setup()
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    if not model_cfg.get("train") or model_cfg.get("path") is not None:
        raise UserError(f"model={model_cfg['name']} is not a trained preset (it needs model.train and model.path=null)")
    path = source.resolve(model_cfg)
    print(train.summary(path), flush=True)


if __name__ == "__main__":
    main()
