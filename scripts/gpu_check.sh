#!/usr/bin/env bash
# One prepared GPU check (about 8 minutes on one H100 or H200; each step has its own time limit): the CUDA/NCCL
# training path, training throughput and MFU of ViT-S/14 and ViT-L/14 with the DinoBloom recipe in bf16 (a GPU
# profile of the ViT-S step, its iBOT loss path alone, larger batches), the ViT-g memory check, the data
# pipeline with 16 workers, ViT-S with train.compile (blocks and cross-entropies compiled; its profile,
# recompilations and graph breaks logged), feature extraction. The steps run most wanted first, so that a check
# cut short still measures what is new. Every figure goes to stdout and to $LOG_DIR/*.log.
#
#   bash scripts/gpu_check.sh [LOG_DIR]
#
# Record the printed figures in docs/benchmarks.md.
set -uo pipefail
cd "$(dirname "$0")/.."
LOG_DIR=${1:-${OUT:-gpu_check_logs}}
mkdir -p "$LOG_DIR"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}

step() {  # step NAME TIMEOUT_S COMMAND...: run one check, keep going if it fails
  local name=$1 limit=$2
  shift 2
  echo "=== $name (limit ${limit}s) ==="
  local start=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee "$LOG_DIR/$name.log" | grep -vE '^\s*$|it/s\]|img/s\]' | tail -n 25
  echo "=== $name: exit ${PIPESTATUS[0]}, $((SECONDS - start)) s ==="
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"

# Heads as released (65,536 prototypes, hidden 2048, bottleneck 256), 224 px global crops only (DinoBloom).
HEADS="--heads 65536,2048,256 --crops dinobloom"
# The NCCL path: torchrun with one process per GPU (here one) initialises NCCL and trains.
# It also writes the operator table of one more step (sorted by GPU time) to vits14_profile.txt: where the
# time that MFU does not account for goes.
step vits14_nccl_bf16 120 torchrun --standalone --nproc_per_node=1 scripts/benchmark_train.py \
  --arch vit_small --batch-size 128 $HEADS --iters 10 --profile "$LOG_DIR/vits14_profile.txt"
head -n 30 "$LOG_DIR/vits14_profile.txt" 2>/dev/null | cut -c1-160
# The iBOT loss path of that step alone (its masked tokens x 65,536 prototypes): Sinkhorn-Knopp, cross-entropy.
step ibot_loss_path 40 $PY scripts/benchmark_loss.py --device cuda --tokens 9749 --iters 10
step vitl14_bf16 120 $PY scripts/benchmark_train.py --arch vit_large --batch-size 64 $HEADS --iters 8
# torch.compile: does the compiled step run compiled kernels (its profile), and what made Dynamo recompile or
# break the graph (in the log)?
step vits14_bf16_compile 150 env TORCH_LOGS=recompiles,graph_breaks $PY scripts/benchmark_train.py \
  --arch vit_small --batch-size 128 $HEADS --compile --iters 8 --profile "$LOG_DIR/vits14_compile_profile.txt"
head -n 20 "$LOG_DIR/vits14_compile_profile.txt" 2>/dev/null | cut -c1-160
# The input pipeline as a CUDA run has it: workers hand over uint8 crops, the colour operations run batched on the
# GPU (its "colour on cuda" row); then, for comparison, with the colour in the workers and crops collated as bf16.
step data_pipeline 90 $PY scripts/benchmark_data.py --demo /tmp/demo_data --recipes dinobloom dinov2 \
  --workers 1 8 16 --batch-size 64 --batches 10
step data_pipeline_colour_in_workers 60 $PY scripts/benchmark_data.py --demo /tmp/demo_data --recipes dinobloom \
  --workers 1 16 --batch-size 64 --batches 10 --colour workers
# The loss path compiled (Sinkhorn-Knopp too, which training compiles only if this says it pays on a GPU).
step ibot_loss_path_compiled 75 $PY scripts/benchmark_loss.py --device cuda --tokens 9749 --iters 10 --compile
# Below: figures measured before, checked again. Does MFU grow with the batch (fixed per-step costs) or not
# (per-image costs)? ViT-S x2, ViT-L x1.5, eager.
step vits14_bf16_b256 90 $PY scripts/benchmark_train.py --arch vit_small --batch-size 256 $HEADS --iters 6
step vitl14_bf16_b96 90 $PY scripts/benchmark_train.py --arch vit_large --batch-size 96 $HEADS --iters 6
step features_vits14 45 $PY scripts/benchmark_features.py --device cuda --batch-size 256 --iters 20
# Memory: ViT-g/14 with SwiGLU, one GPU, activation checkpointing, DinoBloom crops.
step vitg14_bf16_ckpt 120 $PY scripts/benchmark_train.py --arch vit_giant2 --batch-size 32 $HEADS \
  --activation-checkpointing --warmup 2 --iters 4
echo "gpu_check done"
