"""python -m atb_models.serve --model_path DIR [--host 127.0.0.1] [--port 1025] [--served_model_name NAME]
    [--api_key KEY] [--allowed_local_media_path DIR] [--chat_template FILE] [--max_queue N]
    [--shutdown_grace SECONDS]
    [run_pa's engine flags]

An OpenAI-compatible server: POST /v1/chat/completions (stream or not; function calling, which needs a template
that shows the tools for tool_choice "auto": --chat_template), /v1/completions, vLLM's /tokenize and /detokenize;
GET /v1/models, /health, /metrics. Under torchrun (examples/models/qwen2_vl/run_server.sh) rank 0 serves HTTP and
the other ranks follow its steps. SIGINT or SIGTERM stops it: no new request is taken, those running get
--shutdown_grace seconds to finish, the rest are aborted (each client still gets a whole answer: a 503, or its
stream's error event), and it exits 0.
"""

from __future__ import annotations

import argparse
import sys

from atb_models.cli.entry import FlagParser, run_entry_point
from atb_models.cli.run_pa import add_device_arguments, add_engine_arguments

DEFAULT_PORT = 1025  # MindIE Service's
DEFAULT_MAX_QUEUE = 256
DEFAULT_SHUTDOWN_GRACE = 5.0


def build_parser() -> argparse.ArgumentParser:
    parser = FlagParser(prog="python -m atb_models.serve", description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_path", metavar="DIR", required=True, help="the checkpoint folder to serve")
    server = parser.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    server.add_argument("--port", type=int, default=DEFAULT_PORT, help="port to listen on")
    server.add_argument("--served_model_name", metavar="NAME",
                        help="the model's name in the API (default: the model folder's name)")
    server.add_argument("--api_key", metavar="KEY",
                        help="require 'Authorization: Bearer KEY' on /v1/, /tokenize and /detokenize requests")
    server.add_argument("--allowed_local_media_path", metavar="DIR",
                        help="let requests name media as file:// paths inside this folder (default: data: URLs only)")
    server.add_argument("--chat_template", metavar="FILE",
                        help="a Jinja chat template that replaces the checkpoint's: one that shows the model its "
                             "tools (examples/chat_templates/qwen2_vl_tool_use.jinja) lets tool_choice \"auto\" "
                             "work")
    server.add_argument("--max_queue", type=int, metavar="N", default=DEFAULT_MAX_QUEUE,
                        help="requests that may wait for a batch slot; more are answered 503 with Retry-After")
    server.add_argument("--shutdown_grace", type=float, metavar="SECONDS", default=DEFAULT_SHUTDOWN_GRACE,
                        help="after SIGINT or SIGTERM, how long running requests may take to finish before they are "
                             "aborted (their clients get a 503, or a stream its error event and [DONE])")
    add_engine_arguments(parser, batch_help="requests running at once", batch_default=16)
    add_device_arguments(parser)
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks for errors")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def run() -> int:
        from atb_models.serve.server import serve  # torch, the engine and the web stack, once the flags parsed

        return serve(args)

    return run_entry_point(run, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
