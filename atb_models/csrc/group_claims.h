// A linear's column groups (or any units of equal work) shared out among the threads of its parallel region, in
// either library (AVX-512 or AVX2: plain C++ and OpenMP).
//
// Each thread owns an equal run of the units, one contiguous stretch of the packed weights, and takes them from its
// run's front; a thread done with its own run then takes the others' from their back, one unit at a time, until none
// is left. A fixed equal run each (the kernels' earlier way) made a linear wait for its slower thread: on this kit's
// AMD EPYC VM the two threads of a decode step's one-row linear stream at unequal rates, and the first ended 5-20 us
// (qkv, o) or 12-135 us (gate_up, down) before the other, which then streamed alone at 60-85% of two threads' rate
// (docs/PERFORMANCE.md). Which thread computes a unit changes none of its sums.
//
// Kernels that pass over the weights once per chunk of rows (prefill's ROW_CHUNK) claim each chunk's units from a set
// of runs of its own, so that no thread waits for the others between chunks: a chunk is named by its first row.

#pragma once

#include <omp.h>
#include <stdint.h>

#include <atomic>
#include <vector>

namespace {

class GroupClaims {
public:
    // Made by the calling thread before the parallel region, for that region's threads (omp_get_max_threads()):
    // `units` for each chunk of `row_chunk` of the `rows`.
    GroupClaims(int64_t units, int64_t rows, int64_t row_chunk)
        : threads_(omp_get_max_threads()), row_chunk_(row_chunk),
          runs_(static_cast<size_t>(threads_ * (rows > row_chunk ? (rows + row_chunk - 1) / row_chunk : 1))) {
        for (size_t i = 0; i < runs_.size(); i++) {
            const int64_t thread = static_cast<int64_t>(i) % threads_;
            runs_[i].span.store(pack(units * thread / threads_, units * (thread + 1) / threads_),
                                std::memory_order_relaxed);
        }
    }

    // The calling thread's next unit of the chunk from row `first_row` on, or -1 when every unit of it has been
    // taken. Each unit is returned to one thread once; a thread of a smaller team than expected (a nested region's
    // one) takes the absent threads' runs as the others' (a larger one's extra threads take only others').
    int64_t next(int64_t first_row = 0) {
        const int64_t thread = omp_get_thread_num();
        Run* runs = runs_.data() + first_row / row_chunk_ * threads_;
        for (int64_t d = 0; d < threads_; d++) {
            const bool own = d == 0 && thread < threads_;
            Run& run = runs[(thread + d) % threads_];
            int64_t span = run.span.load(std::memory_order_relaxed);
            // Front and end change together in one word: a unit is the owner's or a thief's, never both.
            while (front(span) < end(span)) {
                const int64_t taken = own ? pack(front(span) + 1, end(span)) : pack(front(span), end(span) - 1);
                if (run.span.compare_exchange_weak(span, taken, std::memory_order_relaxed))
                    return own ? front(span) : end(span) - 1;
            }
        }
        return -1;
    }

private:
    struct alignas(64) Run {  // one cache line each: a run's owner claims without touching the others'
        std::atomic<int64_t> span;
    };
    static int64_t pack(int64_t front, int64_t end) { return front | end << 32; }
    static int64_t front(int64_t span) { return span & 0xFFFFFFFF; }
    static int64_t end(int64_t span) { return span >> 32; }

    int64_t threads_, row_chunk_;
    std::vector<Run> runs_;
};

}  // namespace
