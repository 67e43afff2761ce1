#!/usr/bin/env bash
# Accuracy of a multimodal model on a dataset, with MindIE's modeltest command line.
#
#   bash scripts/mm_run.sh DATASET MODEL [--model_path DIR] [--dataset_path PATH] [--world_size N] [--output_dir DIR]
#                          [other modeltest flags: --batch_size N --backend pa|hf --dtype ... --subsets ... --debug]
#   bash scripts/mm_run.sh --help      this text; `python -m modeltest --help` (from tests/modeltest) lists every flag
#
# DATASET: textvqa | videobench; MODEL: qwen2_vl | qwen2_5_vl. The yaml files are modeltest/config/model/MODEL.yaml and
# modeltest/config/task/DATASET.yaml; flags given here win over them. Results go under
# OUTPUT_DIR/<date>/modeltest/MODEL/precision_result/ (OUTPUT_DIR: --output_dir, default tests/modeltest/output).
# World size: --world_size N, else the number of devices in ASCEND_RT_VISIBLE_DEVICES, else in
# CUDA_VISIBLE_DEVICES, else 1; above 1 modeltest starts the ranks through torchrun (MASTER_PORT, default 20050).
# Works from any directory: relative paths in the flags are read from the current one.
set -euo pipefail

usage() { # the comment block above, without its "# "
    sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "${BASH_SOURCE[0]}"
}

HARNESS_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REPO_ROOT="$(cd "${HARNESS_DIR}/../.." && pwd)"
# The harness and the kit from this checkout, whether or not they are pip-installed.
export PYTHONPATH="${HARNESS_DIR}:${REPO_ROOT}${PYTHONPATH:+:${PYTHONPATH}}"
# A folder named modeltest/ or atb_models/ in the current directory cannot stand in for the real ones.
export PYTHONSAFEPATH=1
# Deterministic collectives, so repeated runs give the same answers.
export HCCL_DETERMINISTIC=true LCCL_DETERMINISTIC=1
PYTHON="${PYTHON:-$(command -v python3 || command -v python || echo python)}"

DATASETS=(textvqa videobench)
MODELS=(qwen2_vl qwen2_5_vl)

fail() {
    echo "$1" >&2
    exit 1
}

contains() { # contains WORD LIST...
    local word="$1" item
    shift
    for item in "$@"; do
        [[ "${item}" == "${word}" ]] && return 0
    done
    return 1
}

if (($# >= 1)) && [[ "$1" == -h || "$1" == --help ]]; then
    usage
    exit 0
fi
(($# >= 1)) && [[ -n "$1" ]] || fail "arg1: DATASET is required"
dataset="$1"
contains "${dataset}" "${DATASETS[@]}" || fail "Unsupported dataset : ${dataset}!"
echo "${dataset} is supported!"
(($# >= 2)) && [[ -n "$2" ]] || fail "arg2: MODEL_NAME is required"
model="$2"
contains "${model}" "${MODELS[@]}" || fail "Unsupported model : ${model}!"
echo "${model} is running!"
shift 2

world_size=""
output_dir="${HARNESS_DIR}/output"
modeltest_args=()
while (($#)); do
    case "$1" in
        --world_size | --output_dir)
            (($# >= 2)) || fail "Error: $1 needs a value"
            if [[ "$1" == --world_size ]]; then world_size="$2"; else output_dir="$2"; fi
            shift 2
            continue
            ;;
        --world_size=*) world_size="${1#*=}" ;;
        --output_dir=*) output_dir="${1#*=}" ;;
        *) modeltest_args+=("$1") ;;
    esac
    shift
done

# shellcheck source=/dev/null
source "${REPO_ROOT}/tools/world_size.sh"
[[ -n "${world_size}" ]] || world_size="$(default_world_size)"
[[ "${world_size}" =~ ^[1-9][0-9]*$ ]] || fail "Error: --world_size must be a positive integer, got '${world_size}'"

# Above one rank, modeltest starts the others through atb_models.launch (torchrun reporting a failed rank in one line).
exec "${PYTHON}" -m modeltest --model_config_path "${HARNESS_DIR}/modeltest/config/model/${model}.yaml" \
    --task_config_path "${HARNESS_DIR}/modeltest/config/task/${dataset}.yaml" --world_size "${world_size}" \
    --output_dir "${output_dir}" "${modeltest_args[@]}"
