#!/usr/bin/env bash
# Launch the OpenAI-compatible server (python -m atb_models.serve) on one rank or, through torchrun, on N ranks:
# rank 0 serves HTTP and drives the steps, the other ranks follow them. The launcher flags, MASTER_PORT and the
# torchrun wrapper are run_pa.sh's, beside this script, which does the work.
#
#   bash examples/models/qwen2_vl/run_server.sh [--world_size N] [--nnodes N --node_rank R --master_addr A] \
#       --model_path DIR [--port 1025] [server flags]
#
# SIGINT or SIGTERM stops the job: rank 0 takes no new request, aborts what still runs after a few seconds and
# tells the other ranks to stop. One rank exits 0; under torchrun the launcher reports the signal (130 or 143).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export RUN_PA_MODULE=atb_models.serve
export ATB_MODELS_LAUNCH_SCRIPT="$0"
exec bash "${HERE}/run_pa.sh" "$@"
