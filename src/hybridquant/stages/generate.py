"""The generate stage: a quantized checkpoint, loaded at any layout, continues prompts.

A sanity check of a quantized model before export: the checkpoint is resharded on load when
``parallel.*`` differs from its calibration layout, prompts are formatted with the checkpoint's chat
template (thinking or instruct mode) and continued greedily or by sampling, under
``torch.inference_mode``. Completions are printed; ``output`` also writes them (with token ids) as JSON.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from hybridquant import checkpoint, generation, parallel
from hybridquant.errors import UserError
from hybridquant.ssm_state import StatePrecision

log = logging.getLogger("hybridquant.generate")


def prompts_of(cfg: DictConfig) -> list[str]:
    prompts = list(cfg.prompts or [])
    if cfg.prompts_path:
        path = Path(cfg.prompts_path)
        if not path.is_file():
            raise UserError(f"prompts_path {path} does not exist")
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                prompts.append(str(json.loads(line)["prompt"]))
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise UserError(f"{path}:{number}: not a JSON object with a \"prompt\" ({exc})") from exc
    if not prompts:
        raise UserError("no prompts: set prompts=[...] or prompts_path=<jsonl with {\"prompt\": ...} per line>")
    return prompts


def run(cfg: DictConfig) -> list[dict[str, Any]]:
    from transformers import AutoTokenizer

    t0 = time.perf_counter()
    ckpt, meta, layout = checkpoint.open_at_layout(cfg.checkpoint, cfg.parallel, parallel.world_size_from_env())
    hf_dir = checkpoint.hf_dir(ckpt)
    gen = cfg.generation
    sampling = generation.Sampling(do_sample=gen.do_sample, temperature=gen.temperature, top_k=gen.top_k,
                                   top_p=gen.top_p, seed=gen.seed)
    cache = generation.resolve_cache(gen.cache, layout)
    if gen.max_new_tokens < 1:
        raise UserError(f"generation.max_new_tokens must be >= 1, got {gen.max_new_tokens}")
    texts = prompts_of(cfg)
    tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
    gen_config_path = hf_dir / "generation_config.json"
    gen_config = json.loads(gen_config_path.read_text()) if gen_config_path.is_file() else {}
    stops = generation.stop_ids(tokenizer, gen_config)
    prompts = [generation.format_prompt(tokenizer, text, gen.mode) for text in texts]
    precision = StatePrecision.from_config(OmegaConf.to_container(cfg.inference))

    parallel.init(layout, seed=cfg.seed, backend=cfg.cluster.backend, timeout_s=cfg.cluster.timeout_s)
    loaded, _ = checkpoint.load_quantized(ckpt, layout)
    t_load = time.perf_counter() - t0
    results = []
    for text, prompt in zip(texts, prompts):
        ids = generation.generate(loaded, prompt, gen.max_new_tokens, sampling, stops, cache,
                                  agree=parallel.from_last_stage, precision=precision)
        results.append({"prompt": text, "prompt_ids": prompt, "completion_ids": ids,
                        "completion": tokenizer.decode(ids, skip_special_tokens=False)})
    if parallel.is_main():
        _report(cfg, meta, layout, cache, results, t_load, time.perf_counter() - t0)
    parallel.barrier()
    return results


def _report(cfg, meta, layout, cache, results, t_load, total) -> None:
    gen = cfg.generation
    how = "sampled" if gen.do_sample else "greedy"
    print(f"{meta.get('model')} ({meta.get('recipe')}) at {layout.tag}, {gen.mode} mode, {how}, cache={cache}",
          flush=True)
    for r in results:
        print(f"--- prompt: {r['prompt']}\n{r['completion']}", flush=True)
    tokens = sum(len(r["completion_ids"]) for r in results)
    print(f"time: {total:.1f} s (load {t_load:.1f} s); {tokens} tokens generated", flush=True)
    if cfg.output:
        out = Path(cfg.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".partial")
        record = {"model": meta.get("model"), "recipe": meta.get("recipe"), "layout": layout.tag,
                  "mode": gen.mode, "cache": cache, "sampling": OmegaConf.to_container(gen), "results": results}
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        tmp.rename(out)
