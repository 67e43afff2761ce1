"""Peak host memory of each rank while it loads a checkpoint.

Run it under the launcher, one process per rank, e.g.

    python -m atb_models.launch --nproc_per_node 4 tools/measure_load_memory.py MODEL_DIR [DTYPE]

Each rank prints the growth of its private (anonymous) memory while loading, sampled every 5 ms: the memory the
rank really owns, i.e. its shard plus the replicated parts. It also prints the growth of the peak resident set
(ru_maxrss), which further counts the checkpoint's file pages the rank touched through the memory map: page
cache, shared by the ranks of a node and reclaimable, touched in whole for the row-parallel tensors whose
columns are cut.
"""
import argparse
import os
import resource
import sys
import threading
import time

import torch  # noqa: F401  (imported before the baseline so its own memory is not counted as loading)
import transformers  # noqa: F401

from atb_models.cli.choices import DTYPE_CHOICES
from atb_models.cli.entry import FlagParser, configure_logging, run_entry_point


def status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


class PeakSampler(threading.Thread):
    def __init__(self, field: str):
        super().__init__(daemon=True)
        self.field, self.peak, self.running = field, status_mib(field), True

    def run(self) -> None:
        while self.running:
            self.peak = max(self.peak, status_mib(self.field))
            time.sleep(0.005)


def build_parser() -> argparse.ArgumentParser:
    summary, _, details = __doc__.partition("\n\n")
    # FlagParser: a bad argument is one Error line and exit 1, as in every entry point of the kit (README).
    parser = FlagParser(description=summary, epilog=details,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="checkpoint folder to load (on the CPU)")
    parser.add_argument("dtype", metavar="DTYPE", nargs="?", default="auto", choices=DTYPE_CHOICES,
                        help=f"dtype to load it in: {', '.join(DTYPE_CHOICES)} (default: %(default)s, config.json's "
                             "torch_dtype or a dtype this device runs fast)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_entry_point(lambda: measure(args.model_dir, args.dtype))


def measure(model: str, dtype: str) -> int:
    from atb_models import LLM
    from atb_models.ranks import env_state

    configure_logging(env_state().rank)

    anon_before, rss_before = status_mib("RssAnon"), status_mib("VmRSS")
    sampler = PeakSampler("RssAnon")
    sampler.start()
    llm = LLM(model, dtype=dtype, device="cpu", max_batch_size=1, max_input_length=256, max_output_length=8,
              block_size=16)
    sampler.running = False
    sampler.join()
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    params = sum(p.numel() * p.element_size() for p in llm.runner.model.parameters()) / 2**20
    print(f"rank {os.environ.get('RANK', '0')}: parameters held {params:.0f} MiB, private memory peak "
          f"+{sampler.peak - anon_before:.0f} MiB, resident set peak +{peak_rss - rss_before:.0f} MiB", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
