# Sourced by the sbatch templates: the environment, the rendezvous and `srun torchrun` (one torchrun
# per node, c10d rendezvous on the job's first node, rendezvous id = the job id).
#   HQ_ROOT             the repository (default: the directory sbatch was run from)
#   HQ_SETUP            a file sourced first (activate the venv, load modules)
#   HQ_PYTHON           the Python with the project installed (default: python)
#   HQ_NPROC_PER_NODE   ranks per node (default: the GPUs SLURM gave the node, else 1)
#   HQ_SRUN_ARGS        more srun options, e.g. "--container-image=nvcr.io/nvidia/pytorch:26.01-py3"
HQ_ROOT=${HQ_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
cd "$HQ_ROOT"
if [ -n "${HQ_SETUP:-}" ]; then source "$HQ_SETUP"; fi
: "${SLURM_JOB_ID:?run this with sbatch}"
export MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)}
export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
HQ_NPROC_PER_NODE=${HQ_NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}

hq_srun_torchrun() {  # hq_srun_torchrun STAGE [HYDRA OVERRIDES...]
  local stage=$1; shift
  [ -f "pipeline/$stage.py" ] || { echo "error: no stage pipeline/$stage.py under $HQ_ROOT" >&2; return 2; }
  echo "job $SLURM_JOB_ID${SLURM_ARRAY_TASK_ID:+ (array task $SLURM_ARRAY_TASK_ID)}: $stage on" \
       "$SLURM_JOB_NUM_NODES node(s) x $HQ_NPROC_PER_NODE rank(s), rendezvous $MASTER_ADDR:$MASTER_PORT" >&2
  # shellcheck disable=SC2086
  srun --kill-on-bad-exit=1 --nodes="$SLURM_JOB_NUM_NODES" --ntasks-per-node=1 ${HQ_SRUN_ARGS:-} \
    "${HQ_PYTHON:-python}" -m torch.distributed.run --nnodes="$SLURM_JOB_NUM_NODES" \
      --nproc_per_node="$HQ_NPROC_PER_NODE" --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" \
      --rdzv_id="$SLURM_JOB_ID" "pipeline/$stage.py" "$@"
}
