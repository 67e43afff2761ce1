# Sourced by run_pa.sh and mm_run.sh: the tensor-parallel size a launch script uses when no --world_size is given.

count_devices() { # "0,1,2,3" -> 4; empty -> 0
    local -a ids
    IFS=',' read -r -a ids <<<"$1"
    local n=0 id
    for id in "${ids[@]}"; do
        [[ -n "${id// /}" ]] && n=$((n + 1))
    done
    echo "$n"
}

default_world_size() { # one rank per visible NPU, else per visible GPU, else 1
    local n
    n="$(count_devices "${ASCEND_RT_VISIBLE_DEVICES:-}")"
    ((n > 0)) || n="$(count_devices "${CUDA_VISIBLE_DEVICES:-}")"
    ((n > 0)) || n=1
    echo "$n"
}
