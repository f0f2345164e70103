"""Structured-config schemas for the Hydra apps. YAML under conf/ extends these; a typo in a key
or a wrong type fails at composition, before any process group exists."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class ModelConf:
    name: str = MISSING
    path: Optional[str] = None        # local dir or hub id; None materialises `arch` from `seed`
    seed: int = 0
    dtype: str = "bfloat16"           # float32 | bfloat16 | float16 | auto (the checkpoint's)
    spec: str = "auto"                # auto | te | local (TE-free)
    arch: Dict[str, Any] = field(default_factory=dict)  # HF config.json architecture fields
    train: Optional[Dict[str, Any]] = None  # with path null: train the materialised model (hybridquant.train)


@dataclass
class QuantConf:
    name: str = MISSING
    preset: str = MISSING             # mtq attribute (MAMBA_MOE_FP8_CONSERVATIVE_CFG) or modelopt_recipes:<path>
    description: str = ""
    format: str = ""                  # FP8 | NVFP4 | MIXED_PRECISION
    # What the recipe means: module kind -> weight format; checked after quantize.
    quantized_kinds: Dict[str, str] = field(default_factory=dict)
    kv_cache: Optional[str] = None    # fp8 | none | null (the preset's)
    activations: Optional[str] = None  # FP8 activations: dynamic_per_token | static_per_tensor | null
    algorithm: Optional[Any] = None   # max | mse | null (the preset's)
    keep_bf16: List[Any] = field(default_factory=list)  # [{kinds: [...], layers: adjacent_to_attention | [i, ...]}]
    router_dtype: Optional[str] = None  # fp32 | null (megatron-bridge's for the model: fp32 for Nemotron-H)
    # Per-layer weight formats (what pipeline/autoquant.py writes): global layer -> kind -> format name,
    # each name a ModelOpt preset in `formats` (BF16: unquantized).
    layers: Dict[str, Dict[str, str]] = field(default_factory=dict)
    formats: Dict[str, str] = field(default_factory=dict)
    overrides: List[Any] = field(default_factory=list)
    path: Optional[str] = None        # +quant=file: the recipe file this recipe was read from


@dataclass
class CalibConf:
    # package:NAME (shipped corpus) | a .jsonl or .parquet file | a datasets save_to_disk directory |
    # a Hub dataset id already in the local datasets cache (read offline, never downloaded);
    # null: not set (presets for your data), a one-line error
    path: Optional[str] = "package:calib.jsonl"
    split: Optional[str] = None       # datasets: the split (null: the only one, or train)
    subset: Optional[str] = None      # Hub datasets: the configuration name (null: the default)
    text_column: str = "text"         # plain-text rows
    messages_column: str = "messages"  # conversation rows, rendered with the checkpoint's chat template
    domain_column: str = "domain"     # what calib.mix and the report count by (NVIDIA's post-training data: category)
    thinking: Optional[bool] = None   # conversations: null = as each row says (enable_thinking / reasoning on|off,
                                      # else whether it has reasoning content); true/false for every row
    num_samples: Optional[int] = 32   # >= 1; with a mix: null or the mix's sum
    mix: Dict[str, int] = field(default_factory=dict)  # domain -> samples (exact counts; 0 leaves a domain out); {}: no mix
    max_seq_len: int = 256            # >= 2; samples keep their natural length up to this (no padding)
    seed: int = 0
    all_experts: bool = False         # dispatch every token to every expert for statistics (outputs unchanged)


@dataclass
class ParallelConf:
    tp: int = 1
    pp: int = 1
    ep: int = 1
    etp: int = 1


@dataclass
class ClusterConf:
    name: str = "local"               # local (torchrun here) | slurm (launch/submit.py, --multirun arrays)
    backend: str = "auto"             # auto | gloo | nccl
    timeout_s: int = 600              # collective timeout
    # SLURM (cluster=slurm); ignored by local runs.
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    nodes: int = 1
    gpus_per_node: Optional[int] = None  # null: no GPU request (CPU clusters)
    tasks_per_node: int = 1           # ranks per node (one task per GPU); with mode=torchrun: processes per node
    mode: str = "tasks"               # tasks: one SLURM task per rank | torchrun: one torchrun per node
    cpus_per_task: Optional[int] = None
    mem_gb: Optional[int] = None
    time_min: int = 240
    setup: List[str] = field(default_factory=list)  # shell lines before srun (modules, venv activation)
    container_image: Optional[str] = None  # pyxis/enroot image: srun --container-image
    container_mounts: Optional[str] = None
    array_parallelism: int = 64       # --multirun sweeps: array tasks running at once
    log_dir: str = "runs/slurm"       # submitit folders (job scripts, stdout/stderr, pickles)
    additional_parameters: Dict[str, Any] = field(default_factory=dict)  # more sbatch options


@dataclass
class QuantizeConf:
    model: ModelConf = MISSING
    quant: Optional[QuantConf] = None
    calib: CalibConf = MISSING
    parallel: ParallelConf = MISSING
    cluster: ClusterConf = MISSING
    seed: int = 1234
    output_root: str = "runs"
    run_name: str = MISSING
    probe_path: str = "package:heldout.jsonl"  # held-out text (never used for calibration)
    probe_samples: int = 2            # held-out samples whose logits are recorded before/after quantization


@dataclass
class AutoquantOptions:
    effective_bits: float = 5.5       # budget over the searched modules' weights
    formats: List[str] = field(default_factory=lambda: ["NVFP4", "FP8"])
    presets: Dict[str, str] = field(default_factory=dict)  # format name -> ModelOpt preset
    method: str = "gradient"          # gradient | kl_div
    cost_model: str = "weight"        # weight | active_moe
    score_samples: int = 16
    also_solve: List[float] = field(default_factory=list)
    scores_dir: str = MISSING
    plot: bool = True


@dataclass
class AutoquantConf(QuantizeConf):
    autoquant: AutoquantOptions = MISSING


@dataclass
class RecipeTableConf:
    model: ModelConf = MISSING
    quant: Optional[QuantConf] = None
    per_layer: bool = True            # also print the layer-by-layer grid
    output: Optional[str] = None      # write <output>.md and <output>.json as well


@dataclass
class LoadLayoutConf:
    """Layout to load a saved checkpoint with; a null size means the one it was saved with."""
    tp: Optional[int] = None
    pp: Optional[int] = None
    ep: Optional[int] = None
    etp: Optional[int] = None


@dataclass
class ExportOptions:
    overwrite: bool = False
    max_shard_size: str = "5GB"
    format: str = "modelopt"
    options: Dict[str, Any] = field(default_factory=dict)   # format name -> its options


@dataclass
class ExportConf:
    checkpoint: str = MISSING
    output_dir: str = MISSING
    parallel: LoadLayoutConf = field(default_factory=LoadLayoutConf)
    cluster: ClusterConf = MISSING
    export: ExportOptions = field(default_factory=ExportOptions)
    seed: int = 1234


@dataclass
class InferenceConf:
    ssm_state_dtype: str = "fp32"     # fp32 | fp16 | fp16_stochastic
    seed: int = 0
    philox_rounds: int = 5


@dataclass
class GenerationOptions:
    mode: str = "thinking"            # thinking | instruct | raw
    max_new_tokens: int = 48
    do_sample: bool = False
    temperature: float = 0.6
    top_k: int = 0
    top_p: float = 0.95
    seed: int = 0
    cache: str = "auto"               # auto | recurrent | recompute


@dataclass
class GenerateConf:
    checkpoint: str = MISSING
    parallel: LoadLayoutConf = field(default_factory=LoadLayoutConf)
    cluster: ClusterConf = MISSING
    inference: InferenceConf = MISSING
    prompts: List[str] = field(default_factory=list)
    prompts_path: Optional[str] = None
    output: Optional[str] = None
    generation: GenerationOptions = field(default_factory=GenerationOptions)
    seed: int = 1234


@dataclass
class EvaluationOptions:
    path: str = "package:heldout.jsonl"  # held-out text (must not be the calibration or training text)
    num_samples: int = 16             # the first N samples of the file with at least 2 tokens
    max_seq_len: int = 256            # each sample keeps its natural length up to this
    modes: List[str] = field(default_factory=lambda: ["fake_quant"])  # per Megatron checkpoint: fake_quant | weight_only
    plot: bool = True                 # write evaluation.png


@dataclass
class EvaluateConf:
    model: Optional[ModelConf] = None  # the reference; null: the HF checkpoint the quantize runs came from
    checkpoints: List[str] = field(default_factory=list)  # quantize run dirs / checkpoints, export dirs
    parallel: ParallelConf = MISSING
    cluster: ClusterConf = MISSING
    evaluation: EvaluationOptions = field(default_factory=EvaluationOptions)
    seed: int = 1234
    output_root: str = "runs"
    name: str = MISSING
    run_name: str = MISSING


@dataclass
class QadOptions:
    """Quantization-aware distillation (conf/qad/default.yaml documents each setting)."""
    data: List[Any] = field(default_factory=list)   # [{path, weight, split?, subset?, text_column?, messages_column?}]
    tokens: int = MISSING
    global_batch_size: int = 8
    max_seq_len: int = 256
    lr: float = 1.0e-5
    min_lr: float = 0.0
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    clip_grad: float = 1.0
    temperature: float = 1.0
    top_k: Optional[int] = None
    skip_lm_loss: bool = True
    kd_loss_scale: float = 1.0
    learn_scales: bool = False
    save_every: int = 100
    eval_every: int = 100
    heldout_path: str = "package:heldout.jsonl"
    heldout_samples: int = 8
    seed: int = 0
    thinking: Optional[bool] = None
    moe_aux_loss_coeff: float = 0.0
    update_expert_bias: bool = False
    resume: bool = True


@dataclass
class QadConf:
    checkpoint: str = MISSING
    teacher: Optional[str] = None     # the BF16 checkpoint (default: the source the checkpoint records)
    parallel: LoadLayoutConf = field(default_factory=LoadLayoutConf)
    cluster: ClusterConf = MISSING
    qad: QadOptions = MISSING
    seed: int = 1234
    output_root: str = "runs"
    run_name: str = MISSING
    plot: bool = True


@dataclass
class TrainConf:
    model: ModelConf = MISSING


@dataclass
class ReleaseSpec:
    """One release (conf/experiment/<name>.yaml): what to quantize, how, and how to check it."""
    name: str = MISSING                # the release directory name (and the exported model's name)
    description: str = ""
    model: str = MISSING               # a conf/model choice
    quant: str = MISSING               # a conf/quant choice (with autoquant: the base recipe)
    # autoquant.* settings (effective_bits, formats, ...): when set, the quantize stage is an autoquant
    # run that chooses per-layer formats on the base recipe; {}: quantize with `quant` as it is.
    autoquant: Dict[str, Any] = field(default_factory=dict)
    calib: Dict[str, Any] = field(default_factory=dict)       # calib.* overrides (num_samples, max_seq_len, ...)
    # qad.* settings (data, tokens, lr, ...): when set, a qad stage distils the quantized checkpoint from
    # its source after quantize / autoquant, and export takes the distilled checkpoint.
    qad: Dict[str, Any] = field(default_factory=dict)
    qad_parallel: LoadLayoutConf = field(default_factory=LoadLayoutConf)  # null: as calibrated
    quantize_parallel: ParallelConf = field(default_factory=ParallelConf)
    export_parallel: LoadLayoutConf = field(default_factory=LoadLayoutConf)  # null: as calibrated
    # Export formats, each its own stage and directory: the first is export/, the others export_<format>/.
    formats: List[str] = field(default_factory=lambda: ["modelopt"])
    export_options: Dict[str, Any] = field(default_factory=dict)  # format -> export.options.<format>.* settings
    evaluate_parallel: ParallelConf = field(default_factory=ParallelConf)
    evaluation: Dict[str, Any] = field(default_factory=dict)  # evaluation.* overrides of the evaluate stage
    overrides: Dict[str, List[str]] = field(default_factory=dict)  # more Hydra overrides per stage


@dataclass
class ReleaseConf:
    release: Optional[ReleaseSpec] = None   # set by experiment=<name>
    cluster: ClusterConf = MISSING
    output_root: str = "runs"
    seed: int = 1234
    force: List[str] = field(default_factory=list)  # stages to re-run even when up to date


def register() -> None:
    from omegaconf import OmegaConf

    from hybridquant import cluster, recipes, source

    OmegaConf.register_new_resolver("launch_suffix", cluster.launch_suffix, replace=True)
    OmegaConf.register_new_resolver("checkpoint_name", source.checkpoint_name, replace=True)
    OmegaConf.register_new_resolver("recipe_file_name", recipes.file_recipe_name, replace=True)
    cs = ConfigStore.instance()
    cs.store(name="quantize_schema", node=QuantizeConf)
    cs.store(name="autoquant_schema", node=AutoquantConf)
    cs.store(name="release_schema", node=ReleaseConf)
    cs.store(name="recipe_table_schema", node=RecipeTableConf)
    cs.store(name="export_schema", node=ExportConf)
    cs.store(name="generate_schema", node=GenerateConf)
    cs.store(name="train_schema", node=TrainConf)
    cs.store(name="qad_schema", node=QadConf)
    cs.store(name="evaluate_schema", node=EvaluateConf)
