#!/usr/bin/env bash
# Launch Qwen2.5-VL inference (run_pa.py beside this script) on one rank or, through torchrun, on N ranks: the same
# launcher flags, defaults and exit statuses as examples/models/qwen2_vl/run_pa.sh, which does the work.
#
#   bash examples/models/qwen2_5_vl/run_pa.sh [--world_size N] [--nnodes N --node_rank R --master_addr A] [run_pa flags]
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export RUN_PA_MODULE=examples.models.qwen2_5_vl.run_pa
export ATB_MODELS_LAUNCH_SCRIPT="$0"
exec bash "${HERE}/../qwen2_vl/run_pa.sh" "$@"
