#!/usr/bin/env bash
# The GPU check of issue 11 in one go, for a session that is lent a GPU machine (offline; its
# Python 3.12 image has torch, lightning, torchvision, timm, pytest, but not hydra-core, omegaconf
# or mlflow, nor Fashion-MNIST).
#
#   bash benchmarks/gpu_check.sh prepare     # here, in the repo root: fills the git-ignored .whl/
#                                            # (../shared/tools/device-wheels) and .gpu_kit/ (the data)
#   bash benchmarks/gpu_check.sh run         # there: device tool `run`, carry [".whl", ".gpu_kit"],
#                                            # timeout_s 600; figures land in $OUT (else ./gpu_check_out)
#
# `run` does, logging each step under $OUT: the GPU suite (`pytest -m gpu`); DenseNet-BC (L=100,
# k=12) on Fashion-MNIST with the GPU defaults (trainer=auto: bf16-mixed, channels_last) for
# $EPOCHS epochs, recording epoch time and accuracy; the bench's DenseNet-121 train-step ratios
# against torchvision and timm at 224x224, batch 32. About 6-8 minutes on an H100.
# `SMALL=1 bash benchmarks/gpu_check.sh run` runs the same steps tiny on a CPU, to test the script.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-run}
PY=${PY:-python3}
FMNIST=/usr/share/datasets/fashion-mnist

if [ "$mode" = prepare ]; then
  tool=${SHARED:-../shared}/tools/device-wheels
  [ -x "$tool" ] || tool=/work/shared/tools/device-wheels
  "$tool"   # .whl/: hydra-core, omegaconf, antlr4, mlflow and what they need there (about 35 MB)
  grep -qx '/.gpu_kit/' .git/info/exclude 2>/dev/null || echo '/.gpu_kit/' >> .git/info/exclude
  rm -rf .gpu_kit && mkdir -p .gpu_kit/fashion-mnist
  for f in "$FMNIST"/*-ubyte.gz; do gunzip -c "$f" > ".gpu_kit/fashion-mnist/$(basename "$f" .gz)"; done
  # xz packs the idx files to about 2/3 of Debian's gzip, so data and wheels stay under 64 MiB.
  tar -C .gpu_kit -cJf .gpu_kit/fashion-mnist.tar.xz fashion-mnist && rm -rf .gpu_kit/fashion-mnist
  du -sh .whl .gpu_kit
  echo 'now: device run, command "bash benchmarks/gpu_check.sh run", carry [".whl", ".gpu_kit"], timeout_s 600'
  exit 0
fi

OUT=${OUT:-$PWD/gpu_check_out}        # the summaries (the device tool brings back 8 files at most)
WORK=${WORK:-/tmp/gpu_check_work}     # MLflow store and run folders
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if ! $PY -c 'import hydra, mlflow' 2>/dev/null; then
  [ -d .whl ] || { echo "hydra/mlflow missing and no .whl/: run 'bash benchmarks/gpu_check.sh prepare' first"; exit 1; }
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
if [ ! -e "$FMNIST/train-images-idx3-ubyte.gz" ] && [ ! -e "$FMNIST/train-images-idx3-ubyte" ]; then
  [ -e .gpu_kit/fashion-mnist.tar.xz ] || { echo "no Fashion-MNIST and no .gpu_kit/: run prepare first"; exit 1; }
  mkdir -p "$(dirname "$FMNIST")" && tar -C "$(dirname "$FMNIST")" -xJf .gpu_kit/fashion-mnist.tar.xz
fi

if [ "${SMALL:-0}" = 1 ]; then   # the same steps, tiny, on whatever device there is
  EPOCHS=1; DATA="data.train_size=2048 data.val_size=256 data.test_size=512 cpu_threads=1"; SIZE=32; STEPS=1
  BENCH_EXTRA="--threads 1 --num-classes 10"
else
  EPOCHS=${EPOCHS:-3}; DATA=""; SIZE=224; STEPS=10; BENCH_EXTRA=""
fi
URI=sqlite:///$WORK/mlflow.db

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
  $PY -c 'import torch, lightning; print("torch", torch.__version__, "lightning", lightning.__version__,
  "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")'
} | tee "$OUT/gpu.txt"

echo "== 1/3 GPU suite"
$PY -m pytest -m gpu tests/test_gpu.py -q -rs -p no:cacheprovider 2>&1 | tee "$OUT/pytest_gpu.log" || true

echo "== 2/3 DenseNet-BC (L=100, k=12) on Fashion-MNIST, GPU defaults, $EPOCHS epochs"
# shellcheck disable=SC2086
$PY -m densenet_exp.run model=densenet_bc100_k12 optim=onecycle trainer.max_epochs="$EPOCHS" $DATA \
  trainer.enable_progress_bar=false tracking.uri="$URI" tracking.experiment=gpu_check \
  hydra.run.dir="$WORK/bc100" 2>&1 | tail -5 | tee "$OUT/bc100.log" || echo "the DenseNet-BC run failed"
$PY - "$URI" <<'PYEOF' | tee "$OUT/bc100.md" || echo "no DenseNet-BC figures"
import sys
from mlflow import MlflowClient
client = MlflowClient(sys.argv[1])
(run,) = client.search_runs([client.get_experiment_by_name("gpu_check").experiment_id], max_results=1)
tags, m = run.data.tags, run.data.metrics
print(f"DenseNet-BC L=100 k=12, Fashion-MNIST, {tags.get('gpu', tags.get('device'))}, precision {tags['precision']}, "
      f"batch {run.data.params['data.batch_size']}: test accuracy {m['test/acc']:.4f}")
hist = {k: {p.step: p.value for p in client.get_metric_history(run.info.run_id, k)}
        for k in ("epoch_time_s", "val/acc", "train_images_per_s")}
print("| epoch | epoch time (s) | train img/s | val acc |\n|---|---|---|---|")
for i, step in enumerate(sorted(hist["val/acc"])):
    t = sorted(hist["epoch_time_s"].items())[i][1] if i < len(hist["epoch_time_s"]) else float("nan")
    ips = sorted(hist["train_images_per_s"].items())[i][1] if i < len(hist["train_images_per_s"]) else float("nan")
    print(f"| {i + 1} | {t:.1f} | {ips:.0f} | {hist['val/acc'][step]:.4f} |")
PYEOF

echo "== 3/3 bench: DenseNet-121 train step vs torchvision and timm, ${SIZE}x${SIZE}, batch 32"
# shellcheck disable=SC2086
$PY -m densenet_exp.bench --size "$SIZE" --batch 32 --steps "$STEPS" --warmup 3 --reference tv_densenet121 $BENCH_EXTRA \
  --models densenet121,densenet121:fp32fast,densenet121:fast,densenet121_me:fp32fast,tv_densenet121,tv_densenet121_me,timm_densenet121,timm_densenet121:fp32fast \
  2>/dev/null | tee "$OUT/bench.md" || echo "the bench failed"
echo "figures in $OUT: gpu.txt pytest_gpu.log bc100.md bench.md"
