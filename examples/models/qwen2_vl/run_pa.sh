#!/usr/bin/env bash
# Launch a family's inference (Qwen2-VL's run_pa.py here) on one rank or, through torchrun, on N ranks. Other
# families' run_pa.sh (examples/models/qwen2_5_vl/) run this script with RUN_PA_MODULE naming their run_pa.py.
#
#   bash examples/models/qwen2_vl/run_pa.sh [--world_size N] [--nnodes N --node_rank R --master_addr A] [run_pa flags]
#
# Launcher flags (this script's own; every other flag goes to the program unchanged, its flags listed below):
#   --world_size N     ranks on this node, one per device (default: the devices in ASCEND_RT_VISIBLE_DEVICES, else
#                      in CUDA_VISIBLE_DEVICES, else 1)
#   --nnodes N         nodes in the job (torchrun's, with --node_rank and --master_addr)
#   --node_rank R      this node's rank among them; node 0 hosts the store
#   --master_addr A    address of node 0 (default: MASTER_ADDR, else torchrun's 127.0.0.1)
# Environment: MASTER_PORT, the store's port on node 0 (default 20031; a busy one is reported before any rank
# starts); MASTER_ADDR; PYTHON, the interpreter (default: python3).
#
# Given --model_path but no --input_text, this script asks for a long answer (MindIE's prompt), so outputs reach
# --max_output_length and the Latency/Throughput lines mean something. Without --model_path the demo reader runs and
# run_pa.py asks it the question its sample goes with. Ctrl-C exits 130, SIGTERM 143, at any world size.
# Works from any directory: relative paths in the flags are read from the current one.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)"
export PYTHONPATH="${ROOT}${PYTHONPATH:+:${PYTHONPATH}}"
# The current directory is not put on sys.path (Python 3.11+), so a folder named examples/ or atb_models/ in it
# cannot stand in for the kit's own.
export PYTHONSAFEPATH=1
PYTHON="${PYTHON:-$(command -v python3 || command -v python || echo python)}"
RUN_PA_MODULE="${RUN_PA_MODULE:-examples.models.qwen2_vl.run_pa}"

DEFAULT_INPUT_TEXT="Explain the contents of the picture with more than 500 words and do not Answer the question \
using a single word or phrase."

usage() { # the comment block above, without its "# "
    # Run by a wrapper (qwen2_5_vl/run_pa.sh, run_server.sh): its own block, then this one's from the launcher flags
    # on (for the server, only up to the run_pa paragraphs, which do not apply to it).
    local wrapper="${ATB_MODELS_LAUNCH_SCRIPT:-}" last='^[^#]' keep='^#'
    [[ "${RUN_PA_MODULE}" == *.run_pa ]] || { last='^#$' && keep='^#.'; }
    if [[ -f "${wrapper}" && "$(realpath "${wrapper}")" != "$(realpath "${BASH_SOURCE[0]}")" ]]; then
        sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "${wrapper}"
        echo
        sed -n "/^# Launcher flags/,/${last}/{/${keep}/s/^# \{0,1\}//p}" "${BASH_SOURCE[0]}"
    else
        sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "${BASH_SOURCE[0]}"
    fi
}

usage_error() {
    echo "Error: $1" >&2
    exit 1
}

world_size=""
torchrun_args=()
run_pa_args=()
has_input_text=0
has_model_path=0
show_help=0
while (($#)); do
    case "$1" in
        -h | --help) show_help=1 ;;
        --world_size | --nnodes | --node_rank | --master_addr)
            (($# >= 2)) || usage_error "$1 needs a value"
            if [[ "$1" == --world_size ]]; then
                world_size="$2"
            else
                torchrun_args+=("$1" "$2")
            fi
            shift 2
            continue
            ;;
        --world_size=*) world_size="${1#*=}" ;;
        --nnodes=* | --node_rank=* | --master_addr=*) torchrun_args+=("$1") ;;
        --input_text | --input_text=*)
            has_input_text=1
            run_pa_args+=("$1")
            ;;
        --model_path | --model_path=*)
            has_model_path=1
            run_pa_args+=("$1")
            ;;
        *) run_pa_args+=("$1") ;;
    esac
    shift
done
if ((show_help)); then
    usage
    echo
    echo "${RUN_PA_MODULE}'s flags:"
    exec "${PYTHON}" -m "${RUN_PA_MODULE}" --help
fi
# The long-answer prompt is run_pa's; a module with no --input_text (the server, run_server.sh) gets none.
if ((has_model_path && !has_input_text)) && [[ "${RUN_PA_MODULE}" == *.run_pa ]]; then
    run_pa_args+=(--input_text "${DEFAULT_INPUT_TEXT}")
fi

# shellcheck source=/dev/null
source "${ROOT}/tools/world_size.sh"
[[ -n "${world_size}" ]] || world_size="$(default_world_size)"
[[ "${world_size}" =~ ^[1-9][0-9]*$ ]] || usage_error "--world_size must be a positive integer, got '${world_size}'"

if ((world_size == 1 && ${#torchrun_args[@]} == 0)); then
    # One rank needs no launcher: the process is the whole job.
    exec "${PYTHON}" -m "${RUN_PA_MODULE}" "${run_pa_args[@]}"
fi

if [[ -n "${MASTER_ADDR:-}" ]] && [[ " ${torchrun_args[*]} " != *" --master_addr"* ]]; then
    torchrun_args+=(--master_addr "${MASTER_ADDR}")
fi
# atb_models.launch is torchrun (torch.distributed.run, same options, same interpreter as the single-rank case)
# that reports a failed rank in one line instead of torchrun's report with its own traceback.
# It names this script in its hint when MASTER_PORT is busy.
export ATB_MODELS_LAUNCH_SCRIPT="${ATB_MODELS_LAUNCH_SCRIPT:-$0}"
exec "${PYTHON}" -m atb_models.launch --nproc_per_node "${world_size}" --master_port "${MASTER_PORT:-20031}" \
    "${torchrun_args[@]}" -m "${RUN_PA_MODULE}" "${run_pa_args[@]}"
