"""Print a recipe as a table (module kind x layer -> BF16/FP8/NVFP4/FP32) for any model config,
without loading weights: the model is built on the meta device and ModelOpt configures its quantizers.

    python pipeline/recipe_table.py +quant=super_nvfp4_mixed model=nemotron_3_super_120b_a12b [output=table]
"""

import json
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from hybridquant import logs, parallel, recipe_table, recipes, schema

schema.register()


@hydra.main(config_path="../conf", config_name="recipe_table", version_base="1.3")
@parallel.fail_fast
def main(cfg: DictConfig) -> None:
    logs.setup("WARNING")
    recipe = recipes.require_recipe(cfg)
    parallel.init(parallel.Layout(), seed=0, backend="gloo")
    table = recipe_table.build(recipe, OmegaConf.to_container(cfg.model, resolve=True))
    text = recipe_table.markdown(table, per_layer=cfg.per_layer)
    print(text, flush=True)
    if cfg.output:
        Path(f"{cfg.output}.md").write_text(text + "\n")
        Path(f"{cfg.output}.json").write_text(json.dumps(table.as_dict(), indent=1))
    parallel.shutdown()


if __name__ == "__main__":
    main()
