#!/usr/bin/env bash
# A seeds x class-orders sweep of three methods on SLURM (hydra-submitit-launcher; `pip install -e .[launchers]`),
# then the comparison report. 3 methods x 3 seeds x 3 orders = 27 jobs, one GPU each, at most 9 at once.
#
# Run it on the login node inside tmux/screen: the launching command waits for the jobs and prints each
# job's status; job logs are in $SWEEP_DIR/.submitit/<job id>/. Edit the partition, account and setup lines
# for your cluster. The offline W&B runs of one sweep share the group "sweep-<sweep folder name>";
# upload them with: wandb sync $SWEEP_DIR/*/wandb/offline-run-*
set -euo pipefail
cd "$(dirname "$0")/.."

SWEEP_DIR=${SWEEP_DIR:-outputs/multiruns/slurm_$(date +%Y-%m-%d_%H-%M-%S)}
PARTITION=${PARTITION:-gpu}

.venv/bin/cl-bench -m \
  launcher=slurm \
  hydra.launcher.partition="$PARTITION" \
  hydra.launcher.timeout_min=240 \
  hydra.launcher.gpus_per_node=1 \
  hydra.launcher.cpus_per_task=8 \
  hydra.launcher.mem_gb=32 \
  hydra.launcher.array_parallelism=9 \
  "hydra.launcher.setup=[source $PWD/.venv/bin/activate]" \
  sweep=seeds_x_orders \
  method=seq_ft,simplecil,lwf \
  experiment=cifar100_b50_vit_tiny \
  trainer=gpu \
  hydra.sweep.dir="$SWEEP_DIR" \
  "$@"

.venv/bin/cl-bench-report "$SWEEP_DIR" --out "$SWEEP_DIR/report"
echo "report: $SWEEP_DIR/report/index.html"
