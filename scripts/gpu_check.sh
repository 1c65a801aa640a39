#!/usr/bin/env bash
# One prepared GPU check, within a time budget (GPU_CHECK_BUDGET_S, default 480 s: a lent GPU session is short):
# the torchrun launch path, training throughput and MFU of ViT-S/14 and ViT-L/14 with the DinoBloom recipe in
# bf16 (ViT-S with train.compile: the blocks or the backbone whole, with and without CUDA graphs, with Inductor's C++
# wrapper and with train.compile_tuning, a GPU profile of its step with and without them, one block under each
# compile setting; its iBOT loss path alone; attention), the data pipeline with 16 workers, the training command end
# to end on the demo images, feature extraction, larger batches and the ViT-g memory check. The steps run most
# wanted first; each has its own time limit, cut to what is left of the budget, and a step left less than half of
# its limit is skipped (a benchmark prints its figures at its end), so a check cut short still measures what is new.
#
#   bash scripts/gpu_check.sh [LOG_DIR]
#
# GPU_CHECK_STEPS="NAME ..." (spaces or commas) runs only the steps named, in the script's order; a name that is no
# step is refused before anything runs, with the list of steps. train_vits14_demo_compile and
# train_vits14_demo_cuda_graphs read the demo images that data_pipeline writes: name it too.
#
# LOG_DIR (default $OUT, else gpu_check_logs/) receives few files, written as the steps run, so that they survive a
# kill: gpu_check.log (everything), summary.txt (each step's exit status, time and last 30 result lines) and the
# two profiles of the ViT-S step (.txt tables, gzipped .json.gz traces). Record the figures in docs/benchmarks.md.
# The exit status is 1 when a step failed or ran out of time (the others still ran), 2 for a usage error; steps the
# budget left no time for are named at the end, and are no failure.
set -uo pipefail
if [[ ${1:-} == -h || ${1:-} == --help ]]; then
    sed -n '2,/^set -uo/{/^set -uo/d;s/^# \{0,1\}//;p}' "$0"
    exit 0
fi
if [[ ${1:-} == -* ]]; then
    echo "error: unknown option $1 (usage: bash scripts/gpu_check.sh [LOG_DIR]; --help for more)" >&2
    exit 2
fi
SELF="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
mapfile -t ALL_STEPS < <(sed -n 's/^step \([^ ]*\) .*/\1/p' "$SELF")
STEPS=${GPU_CHECK_STEPS:-}
read -ra SELECTED <<< "$(tr ',\n' '  ' <<< "$STEPS")"
if [[ -n $STEPS ]] && ((${#SELECTED[@]} == 0)); then
  echo "error: GPU_CHECK_STEPS is set but names no step; the steps: ${ALL_STEPS[*]}" >&2
  exit 2
fi
for name in "${SELECTED[@]}"; do  # compared as text, not as patterns
  if [[ " ${ALL_STEPS[*]} " != *" $name "* ]]; then
    echo "error: GPU_CHECK_STEPS names $name, which is no step of gpu_check.sh; the steps: ${ALL_STEPS[*]}" >&2
    exit 2
  fi
done
# A relative LOG_DIR is the caller's, made absolute before the check moves to the repository's root.
LOG_DIR=${1:-${OUT:-gpu_check_logs}}
mkdir -p "$LOG_DIR"
LOG_DIR=$(cd "$LOG_DIR" && pwd)
cd "$(dirname "$0")/.."
LOG="$LOG_DIR/gpu_check.log"
SUMMARY="$LOG_DIR/summary.txt"
: > "$LOG"
: > "$SUMMARY"
# Full tracebacks in the log: a one-shot check has no second chance to ask for them.
export PYTHONUNBUFFERED=1 DINOBLOOM_TRACEBACK=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET_S:-480}

step() {  # step NAME TIMEOUT_S COMMAND...: run one check within the budget, keep going if it fails
  local name=$1 limit=$2
  shift 2
  if ((${#SELECTED[@]})) && [[ " ${SELECTED[*]} " != *" $name "* ]]; then
    return
  fi
  local left=$((BUDGET - SECONDS))
  if ((left < 20)); then
    echo "=== $name: skipped, ${left} s of the ${BUDGET} s budget left ===" | tee -a "$LOG" "$SUMMARY"
    SKIPPED+=("$name")
    return
  fi
  # a step that ignores the stop signal (train.py finishes its iteration) is killed 10 s later: within the budget
  if ((limit > left - 10)); then
    # A benchmark prints its figures at its end: cut to under half its time, it would likely leave nothing.
    if ((2 * (left - 10) < limit)); then
      echo "=== $name: skipped, ${left} s of the ${BUDGET} s budget left, under half its ${limit} s ===" \
        | tee -a "$LOG" "$SUMMARY"
      SKIPPED+=("$name")
      return
    fi
    limit=$((left - 10))
  fi
  echo "=== $name (limit ${limit}s) ===" | tee -a "$LOG"
  local start=$SECONDS
  # The step's last lines (its figures, or its error) go to the summary, without progress bars and the profiler's
  # own messages (which would push the figures out).
  timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$LOG" \
    | grep -vE '^\s*$|it/s\]|img/s\]|^(USDT|STAGE):|^(INFO|WARNING|ERROR):[0-9]{4}-' | tail -n 30 > "$LOG_DIR/.tail"
  local status=${PIPESTATUS[0]}
  ((status != 0)) && FAILED+=("$name")
  { echo "=== $name: exit $status, $((SECONDS - start)) s ==="; cat "$LOG_DIR/.tail"; } >> "$SUMMARY"
  rm -f "$LOG_DIR/.tail"
  echo "=== $name: exit $status, $((SECONDS - start)) s ===" | tee -a "$LOG"
}
FAILED=()
SKIPPED=()

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$LOG" "$SUMMARY"
# Preflight: without CUDA or the carried packages every step would fail or, worse, fall back to the CPU and spend
# the budget there; a TORCH_LOGS name that this torch does not know would stop every step that sets it at import.
LOG_NAMES=$(sed -n 's/.* TORCH_LOGS=\([a-z_,]*\) .*/\1/p' "$SELF" | tr ',' '\n' | sort -u | paste -sd, -)
if ! TORCH_LOGS=$LOG_NAMES $PY -c "import torch, omegaconf; assert torch.cuda.is_available(), 'no CUDA device'; \
print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())" 2>&1 \
    | tee -a "$LOG" "$SUMMARY"; then
  echo "gpu_check: preflight failed (see above); nothing measured" | tee -a "$SUMMARY"
  exit 1
fi

# Heads as released (65,536 prototypes, hidden 2048, bottleneck 256), 224 px global crops only (DinoBloom).
HEADS="--heads 65536,2048,256 --crops dinobloom"
# The tuned compiled ViT-S step at batch 128 was paced by the host (64.5 ms to queue 58 ms of kernels; untuned, a
# tie). First the untuned compiled step (blocks, heads, cross-entropies, Sinkhorn-Knopp), the baseline of the three
# steps after it on the same machine; what made Dynamo recompile or break the graph goes to the log.
step vits14_bf16_compile 150 env TORCH_LOGS=recompiles,graph_breaks $PY scripts/benchmark_train.py \
  --arch vit_small --batch-size 128 $HEADS --compile --iters 8
# Three ways to cut the host's work per step (compare s_per_iter and host_s_per_iter with the step above): CUDA
# graphs of the compiled blocks (their kernels come from the step above's cache), the backbone compiled as one graph
# (a few compiled calls per step instead of 36 blocks'; its compilation took twice the blocks' on a CPU), and both.
# The logs name what kept graphs from being captured; cudagraph_skips in the figures counts it.
step vits14_bf16_compile_cuda_graphs 150 env TORCH_LOGS=recompiles,cudagraphs,perf_hints \
  $PY scripts/benchmark_train.py --arch vit_small --batch-size 128 $HEADS --compile --iters 8 train.cuda_graphs=true
step vits14_bf16_compile_backbone 240 env TORCH_LOGS=recompiles,graph_breaks $PY scripts/benchmark_train.py \
  --arch vit_small --batch-size 128 $HEADS --compile --iters 8 train.compile_scope=backbone
step vits14_bf16_compile_backbone_cuda_graphs 240 env TORCH_LOGS=recompiles,graph_breaks,cudagraphs,perf_hints \
  $PY scripts/benchmark_train.py --arch vit_small --batch-size 128 $HEADS --compile --iters 8 \
  train.compile_scope=backbone train.cuda_graphs=true
# train.compile with train.compile_tuning (coordinate-descent tuning of the blocks' kernels): 58 ms of kernels per
# step, which the host took 64.5 ms to queue on one machine (host_s_per_iter); 2-4 minutes with its compilation.
# Its operator table (sorted by GPU time) goes to vits14_compile_profile.txt.
step vits14_bf16_compile_tuning 240 $PY scripts/benchmark_train.py --arch vit_small --batch-size 128 $HEADS \
  --compile --iters 8 --profile "$LOG_DIR/vits14_compile_profile.txt" train.compile_tuning=true
# The same with Inductor's C++ wrapper, which launches the compiled kernels from C++, not Python: does
# host_s_per_iter fall, and the step with it? (The tuned kernels come from the step above's cache.)
step vits14_bf16_compile_tuning_cpp_wrapper 240 $PY scripts/benchmark_train.py --arch vit_small --batch-size 128 \
  $HEADS --compile --iters 8 --inductor cpp_wrapper=True train.compile_tuning=true
# Tuned at batch 256 (31.6 % MFU; untuned, on another machine, 30.9 %): the goal is 35 %.
step vits14_bf16_b256_compile_tuning 240 $PY scripts/benchmark_train.py --arch vit_small --batch-size 256 $HEADS \
  --compile --iters 8 train.compile_tuning=true
# One block under each compile setting (max-autotune left out: cuBLAS beat its templates, and it compiles for minutes).
step block_compile_modes 90 $PY scripts/benchmark_block.py --device cuda --modes eager compiled coordinate-descent
# The torchrun launch path (as a module of this interpreter), one process: with one rank no process group is made
# (NCCL and FSDP2 need two GPUs); trains eagerly, and its operator table goes to vits14_profile.txt.
step vits14_torchrun_bf16 120 $PY -m torch.distributed.run --standalone --nproc_per_node=1 scripts/benchmark_train.py \
  --arch vit_small --batch-size 128 $HEADS --iters 10 --profile "$LOG_DIR/vits14_profile.txt"
# The iBOT loss path of that step alone (its masked tokens x 65,536 prototypes): Sinkhorn-Knopp and cross-entropy,
# compiled as train.compile compiles them on a GPU (eager: 13.5 and 14.2 ms on an H200). Its compilation took over
# 60 s once.
step ibot_loss_path_compiled 120 $PY scripts/benchmark_loss.py --device cuda --tokens 9749 --iters 10 --compile
# SDPA's backends at the ViT-S and ViT-L shapes (257 tokens): is the one PyTorch picks (cuDNN on an H200) the fastest?
step attention_backends 30 $PY scripts/benchmark_attention.py --device cuda --iters 10
step vitl14_bf16 120 $PY scripts/benchmark_train.py --arch vit_large --batch-size 64 $HEADS --iters 8
# The input pipeline as a CUDA run has it: workers hand over uint8 crops, the colour operations run batched on the
# GPU (its "colour on cuda" row). For comparison, the colour in the workers (crops collated as bf16) runs later.
step data_pipeline 90 $PY scripts/benchmark_data.py --demo /tmp/demo_data --recipes dinobloom dinov2 \
  --workers 1 16 --batch-size 64 --batches 10
# End to end: the training command itself on the demo images (written by the step above), ViT-S/14 compiled, 16
# workers, colour on the GPU: do the data pipeline and the colour operations keep up with the compiled step? The
# status lines' img/s after the compilation answer it. A fresh folder, so that it starts rather than resumes.
rm -rf /tmp/gpu_check_train
step train_vits14_demo_compile 150 $PY dinov2/train/train.py --config-file dinov2/configs/train/custom.yaml \
  --output-dir /tmp/gpu_check_train train.dataset_path=/tmp/demo_data/lists student.arch=vit_small \
  student.pretrained_weights=null train.batch_size_per_gpu=128 train.num_workers=16 train.compile=true \
  train.OFFICIAL_EPOCH_LENGTH=100 optim.epochs=1 optim.warmup_epochs=0 teacher.warmup_teacher_temp_epochs=0
# The same with the backbone compiled whole and replayed as CUDA graphs, and the monitors on (RankMe's teacher calls
# come between the graphs' steps, the kNN monitor's batches of another shape before the first step and after the
# last): does the loop run, and how fast? (Name data_pipeline too: it writes the images.)
rm -rf /tmp/gpu_check_train_graphs
step train_vits14_demo_cuda_graphs 240 env TORCH_LOGS=recompiles,cudagraphs,perf_hints $PY dinov2/train/train.py \
  --config-file dinov2/configs/train/custom.yaml --output-dir /tmp/gpu_check_train_graphs \
  train.dataset_path=/tmp/demo_data/lists student.arch=vit_small student.pretrained_weights=null \
  train.batch_size_per_gpu=128 train.num_workers=16 train.compile=true train.compile_scope=backbone \
  train.cuda_graphs=true train.OFFICIAL_EPOCH_LENGTH=100 optim.epochs=1 optim.warmup_epochs=0 \
  teacher.warmup_teacher_temp_epochs=0 evaluation.knn_data=/tmp/demo_data/images evaluation.eval_period_iterations=50 \
  evaluation.rankme_period_iterations=50 evaluation.rankme_batches=5
step features_vits14 45 $PY scripts/benchmark_features.py --device cuda --batch-size 256 --iters 20
# What `extract_features --precision bf16 --compile` gives on the GPU, ours and timm alike.
step features_vits14_bf16_compile 90 $PY scripts/benchmark_features.py --device cuda --batch-size 256 --iters 20 \
  --precision bf16 --compile
# Below: figures measured before, checked again if time is left. Does MFU grow with the batch (fixed per-step
# costs) or not (per-image costs)? ViT-S x2, ViT-L x1.5, eager.
step vits14_bf16_b256 90 $PY scripts/benchmark_train.py --arch vit_small --batch-size 256 $HEADS --iters 6
step vitl14_bf16_b96 90 $PY scripts/benchmark_train.py --arch vit_large --batch-size 96 $HEADS --iters 6
step data_pipeline_colour_in_workers 60 $PY scripts/benchmark_data.py --demo /tmp/demo_data --recipes dinobloom \
  --workers 1 16 --batch-size 64 --batches 10 --colour workers
# Memory: ViT-g/14 with SwiGLU, one GPU, activation checkpointing, DinoBloom crops.
step vitg14_bf16_ckpt 120 $PY scripts/benchmark_train.py --arch vit_giant2 --batch-size 32 $HEADS \
  --activation-checkpointing --warmup 2 --iters 4
echo "gpu_check done in $SECONDS s" | tee -a "$LOG" "$SUMMARY"
if ((${#SKIPPED[@]})); then
  echo "gpu_check: ${#SKIPPED[@]} step(s) not run, the budget spent: ${SKIPPED[*]}" | tee -a "$LOG" "$SUMMARY"
fi
if ((${#FAILED[@]})); then
  echo "gpu_check: ${#FAILED[@]} step(s) failed or ran out of time: ${FAILED[*]}" | tee -a "$LOG" "$SUMMARY"
fi
echo "===== summary ====="
cat "$SUMMARY"
((${#FAILED[@]} == 0))  # the exit status: 1 when a step failed (its figures may be missing)
