"""Every export format and type of one quantized checkpoint, judged by its real consumer where one runs here.

    .venv/bin/python bench/export_formats.py                      # the trained tiny model (FP8 + NVFP4 recipes)
    .venv/bin/python bench/export_formats.py --model tiny_wide    # rows of 256: real K-quants in GGUF

For each recipe it quantizes the model once (1 rank), exports it in every format at one rank and at
EP2 (two ranks; --layout to change), and prints per format and type: the weight files' size against the BF16 model, the
logits against the unquantized source on held-out text (relative L2, top-1 agreement) as the consumer
reads them (llama.cpp runs the GGUF file itself; the compressed-tensors library decompresses its
export; the ModelOpt export through the package's independent reader), and whether the two layouts
wrote the same sha256 for every file.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from _common import quantize, stage

GGUF_TYPES = ["F16", "Q8_0", "Q4_K_M"]
RECIPES = {"fp8": ["+quant=mamba_moe_fp8_conservative", "quant.kv_cache=none"],
           "nvfp4": ["+quant=mamba_moe_nvfp4_aggressive", "quant.kv_cache=none"]}


def heldout_ids(source: str, samples: int, length: int) -> list[list[int]]:
    from transformers import AutoTokenizer

    from hybridquant import calib

    tok = AutoTokenizer.from_pretrained(source)
    batch = calib.load("package:heldout.jsonl", tok, num_samples=samples, max_seq_len=length, seed=0).samples
    return [torch.as_tensor(row).reshape(-1).tolist() for row in batch]


def compare(logits: list[torch.Tensor], reference: list[torch.Tensor]) -> tuple[float, float]:
    a, b = torch.cat(logits), torch.cat(reference)
    return float((a - b).norm() / b.norm()), float((a.argmax(-1) == b.argmax(-1)).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny_trained")
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--layout", default="ep=2", help="the second layout, parallel.<size>=<n> on 2 ranks")
    args = parser.parse_args()

    from hybridquant import hf_reference, readers
    from hybridquant import llamacpp

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rows = []
        for recipe, overrides in RECIPES.items():
            run_dir = quantize(tmp / recipe, 1, [f"model={args.model}", *overrides, "calib.num_samples=8",
                                                 "calib.max_seq_len=128"])
            source = json.loads((run_dir / "checkpoint" / "hybridquant.json").read_text())["source"]
            ids = heldout_ids(source, args.samples, args.length)
            model = hf_reference.load(source, max_seq_len=args.length, dtype=torch.float32, strict=True)
            with torch.no_grad():
                reference = [model(torch.tensor([x])).logits[0] for x in ids]
            params = sum(p.numel() for p in model.parameters())
            bf16_bytes = 2 * params
            del model
            exports = {"modelopt": [], "compressed_tensors": []}
            if recipe == next(iter(RECIPES)):  # GGUF is made from the BF16 weights: the same for every recipe
                exports["gguf"] = [f"export.options.gguf.types=[{','.join(GGUF_TYPES)}]"]
            for fmt, options in exports.items():
                outs = {}
                for layout, nproc, extra in (("1 rank", 1, []), ("other", 2, [f"parallel.{args.layout}"])):
                    out = tmp / f"{recipe}-{fmt}-{nproc}"
                    stage("export", nproc, [f"checkpoint={run_dir}", f"output_dir={out}", f"export.format={fmt}",
                                            *options, *extra])
                    outs[layout] = out
                a = json.loads((outs["1 rank"] / "manifest.json").read_text())
                b = json.loads((outs["other"] / "manifest.json").read_text())
                same = {n: e["sha256"] for n, e in a["files"].items()} == {n: e["sha256"] for n, e in b["files"].items()}
                out = outs["1 rank"]
                if fmt == "gguf":
                    for gguf_type, entry in a["gguf"].items():
                        path = out / entry["file"]
                        logits = [llamacpp.logits(path, x) for x in ids]
                        rel, top1 = compare(logits, reference)
                        rows.append((recipe, f"GGUF {gguf_type} (llama.cpp)", a["files"][entry["file"]]["bytes"],
                                     bf16_bytes, rel, top1, same))
                else:
                    hf, _ = readers.build_model(out, tmp / f"{recipe}-{fmt}-hf", max_seq_len=args.length)
                    with torch.no_grad():
                        logits = [hf(torch.tensor([x])).logits[0] for x in ids]
                    rel, top1 = compare(logits, reference)
                    size = sum(e["bytes"] for n, e in a["files"].items() if n.endswith(".safetensors"))
                    judge = "compressed-tensors library" if fmt == "compressed_tensors" else "independent reader"
                    rows.append((recipe, f"{fmt} {a['quantization']} ({judge})", size, bf16_bytes, rel, top1, same))
        print(f"model {args.model}: logits vs the unquantized source on {args.samples} held-out samples of "
              f"{args.length} tokens; size = weight files vs the BF16 model (2 bytes per parameter)")
        print(f"| recipe | export (read by) | size MiB | vs BF16 | rel L2 | top-1 | same sha256 at {args.layout} |")
        print("|---|---|---|---|---|---|---|")
        for recipe, what, size, bf16, rel, top1, same in rows:
            print(f"| {recipe} | {what} | {size / 2**20:.2f} | {size / bf16:.3f} | {rel:.4f} | {top1:.3f} | "
                  f"{'yes' if same else 'NO'} |")


if __name__ == "__main__":
    main()
