"""One process of the server. Rank 0 checks the flags, binds the port (a busy one is one line, before the model
loads), builds the engine thread and runs uvicorn until a signal; the other ranks of a torchrun job build the same
engine and follow rank 0's steps (`engine.follow`) until it says stop."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import logging
import os
import signal
import socket

import uvicorn

from atb_models.cli.entry import configure_logging
from atb_models.cli.run_pa import engine_options
from atb_models.config import load_model_config
from atb_models.errors import UserError
from atb_models.ranks import env_state
from atb_models.serve.app import ApiService, ServerConfig, create_app
from atb_models.serve.engine import EngineLoop, follow
from atb_models.serve.metrics import ServerMetrics

logger = logging.getLogger("atb_models.serve")

# After the grace, the engine's abort of what still runs reaches each handler, which ends its answer; uvicorn cancels
# only what has not ended this much later.
SHUTDOWN_DRAIN_S = 5.0


def serve(args: argparse.Namespace) -> int:
    ranks = env_state()
    configure_logging(ranks.rank)
    config = server_config(args)

    def build_llm():
        from atb_models.engine.llm import LLM

        llm = LLM(args.model_path, **engine_options(args), chat_template=args.chat_template)
        llm.matchers.prepare()  # (not at the first constrained request, on the engine's thread: every rank)
        return llm

    if ranks.rank != 0:
        return run_follower(build_llm)
    sock = bind(args.host, args.port)
    metrics = ServerMetrics()
    server: uvicorn.Server | None = None

    def stop_serving() -> None:  # from the engine thread: the engine is gone, so is the server
        if server is not None:
            server.should_exit = True

    engine = EngineLoop(build_llm, metrics, ranks.world_size, stop_serving)
    app = create_app(ApiService(config, engine, metrics))
    server = QuietSignalServer(uvicorn.Config(app, log_config=None, log_level="warning", access_log=False,
                                              timeout_graceful_shutdown=args.shutdown_grace + SHUTDOWN_DRAIN_S,
                                              lifespan="on"),
                               args.shutdown_grace, engine.stop)
    logger.info("serving %s on http://%s:%d (the model loads now; /health answers 200 once it has)",
                config.model_name, args.host, args.port)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    if engine.failure is not None:
        raise engine.failure
    logger.info("stopped")
    return 0


def server_config(args: argparse.Namespace) -> ServerConfig:
    """The server's flags checked, and the model folder's config read, before the port is bound."""
    load_model_config(args.model_path)  # a bad folder is news now, not after the server is up
    if not 0 < args.port < 65536:
        raise UserError(f"--port must be in 1..65535, got {args.port}")
    if args.max_queue < 1:
        raise UserError(f"--max_queue must be at least 1, got {args.max_queue}")
    if not 0 <= args.shutdown_grace <= 3600:
        raise UserError(f"--shutdown_grace must be 0 to 3600 seconds, got {args.shutdown_grace}")
    if args.api_key is not None and not args.api_key.strip():
        raise UserError("--api_key is empty")
    allowed = args.allowed_local_media_path
    if allowed is not None and not os.path.isdir(allowed):
        raise UserError(f"--allowed_local_media_path {allowed}: not a folder")
    name = args.served_model_name or os.path.basename(os.path.normpath(os.path.abspath(args.model_path)))
    return ServerConfig(name, args.api_key, allowed, args.max_queue)


def bind(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise UserError(f"--host {host}: {e.strerror}") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        busy = " (another server?): pick another --port" if e.errno == errno.EADDRINUSE else ""
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror}{busy}") from None
    sock.set_inheritable(True)
    return sock


def run_follower(build_llm) -> int:
    """A rank other than 0. Rank 0 decides when the job ends (its stop plan after a signal, every running request
    aborted first), so a signal torchrun forwards here is ignored: leaving mid-step would break rank 0's
    collective. Should rank 0 die, torchrun's agent ends this rank."""
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    llm = build_llm()
    try:
        follow(llm)
    finally:
        llm.close()
    return 0


class QuietSignalServer(uvicorn.Server):
    """A signal is this server's normal way to stop: it shuts down gracefully and the process exits 0. uvicorn
    would raise the signal again once shut down, which the kit's entry point turns into 143.

    Its graceful shutdown waits for the connections, then cancels their handlers, which would leave a client a
    cut stream or a bare 500. So `grace` seconds into it, `stop_engine` aborts every running request: each
    handler hears the engine is gone and ends its answer (a 503 in OpenAI's shape, a stream's error event and
    [DONE]) before uvicorn's own limit, SHUTDOWN_DRAIN_S later."""

    def __init__(self, config: uvicorn.Config, grace: float, stop_engine):
        super().__init__(config)
        self._grace, self._stop_engine = grace, stop_engine

    async def shutdown(self, sockets=None) -> None:
        stopping = asyncio.ensure_future(self._stop_engine_after_grace())
        try:
            await super().shutdown(sockets)
        finally:
            stopping.cancel()

    async def _stop_engine_after_grace(self) -> None:
        await asyncio.sleep(self._grace)
        await asyncio.to_thread(self._stop_engine)

    @contextlib.contextmanager
    def capture_signals(self):
        with super().capture_signals():
            try:
                yield
            finally:
                self._captured_signals.clear()
