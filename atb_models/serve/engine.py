"""The engine side of the server: one thread owns the LLM and runs its steps; the asyncio side talks to it through
a thread-safe command queue (requests to add, requests to abort, stop) and per-request callbacks.

Between two steps the thread takes every command that arrived, so a request joins the running batch at the next
step and an abort frees its KV blocks before it. Under torchrun rank 0 runs this thread; before each step it
broadcasts the step's `StepPlan` (the new requests, preprocessed on rank 0, pixels included, and the aborts) and
every other rank applies the same plan to its own LLM (`follow`), so all schedulers stay in step. When idle, rank 0
still sends an empty plan every HEARTBEAT_S, so the followers' collective never waits out its timeout.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from atb_models import distributed
from atb_models.errors import UserError

logger = logging.getLogger("atb_models.serve")

HEARTBEAT_S = 1.0
# How long an idle engine holds its first step for requests that arrived with the first one and are still being
# preprocessed, so that they are prefilled together (as one generate() call would) rather than one step later, each
# of the next prefills pausing the decodes already running. Never waited while anything runs.
ADMISSION_WINDOW_S = 0.5
ADMISSION_POLL_S = 0.005
STOP_JOIN_S = 30.0  # how long stopping waits for the thread (a model still loading finishes first)


@dataclass(frozen=True)
class NewRequest:
    request_id: int
    prompt: object  # a ProcessedPrompt
    params: object  # a SamplingParams


@dataclass
class StepPlan:
    """What every rank applies to its LLM before the next step."""

    adds: list = field(default_factory=list)  # NewRequests
    aborts: list = field(default_factory=list)  # request ids
    stop: bool = False


def apply_plan(llm, plan: StepPlan, on_added: Optional[Callable] = None, on_aborted: Optional[Callable] = None) -> None:
    """Adds and aborts, in the same order on every rank; `on_added(request_id, error)` hears how each add went
    (error: the UserError's message, or None), `on_aborted(output)` of each request an abort ended. A request that
    cannot run is refused alike on every rank."""
    for new in plan.adds:
        try:
            llm.add_request(new.prompt, new.params, request_id=new.request_id)
            error = None
        except UserError as e:
            error = str(e)
        if on_added is not None:
            on_added(new.request_id, error)
    for request_id in plan.aborts:
        aborted = llm.abort(request_id)
        if aborted is not None and on_aborted is not None:
            on_aborted(aborted)


def follow(llm) -> None:
    """A rank other than 0: apply rank 0's plans and run the same steps until it says stop."""
    while True:
        plan = distributed.broadcast_from_rank0(None)
        if plan.stop:
            return
        apply_plan(llm, plan)
        if llm.has_unfinished():
            llm.step()


@dataclass
class EngineEvent:
    """What the engine tells a request's handler: "accepted", "rejected" (message), "output" (a RequestOutput
    snapshot, after every step that advanced it; the last one is finished) or "failed" (message)."""

    kind: str
    output: object = None
    message: Optional[str] = None


class EngineLoop:
    """The LLM's thread. `build_llm` runs in it (the server answers /health with 503 meanwhile)."""

    def __init__(self, build_llm: Callable, metrics, world_size: int, on_fatal: Callable[[], None]):
        self._build_llm = build_llm
        self.metrics = metrics
        self.world_size = world_size
        self._on_fatal = on_fatal  # tells the HTTP server to stop: the engine is gone
        self._commands: queue.Queue = queue.Queue()
        self._sinks: dict = {}  # request id -> callable(EngineEvent), called from this thread
        self.llm = None
        self.ready = threading.Event()
        self.failure: Optional[BaseException] = None
        self.num_waiting = 0  # requests waiting for a batch slot, as of the latest step
        self.num_running = 0  # requests in the running batch, as of the latest step
        self.preparing = 0  # requests the HTTP side is preprocessing for this engine (it counts them)
        self._planned = 0  # requests taken into the plan since the latest step: in neither count above yet
        # Requests submitted, and those the engine thread took from the command queue: each counter written by one
        # thread only. Their difference is the requests in the queue, whose size counts aborts too.
        self._submitted = 0
        self._taken = 0
        self._thread = threading.Thread(target=self._run, name="atb-engine", daemon=True)

    # ------------------------------------------------------------------------------------------ the asyncio side
    def start(self) -> None:
        self._thread.start()

    def submit(self, request: NewRequest, sink: Callable) -> None:
        self._submitted += 1
        self._commands.put(("add", request, sink))

    def abort(self, request_id: int) -> None:
        self._commands.put(("abort", request_id, None))

    def queued(self, arriving: int = 0) -> int:
        """Requests that wait for a batch slot, or will, once `arriving` more come: of every request not finished
        (being preprocessed, submitted, taken into the next step's plan, waiting, running), those beyond the
        batch's slots. A burst into free slots waits for none."""
        outstanding = self.preparing + self._in_queue() + self._planned + self.num_waiting + self.num_running
        return max(0, outstanding + arriving - self.llm.scheduler.max_batch_size)

    def _in_queue(self) -> int:
        """Requests submitted and not yet taken (an abort or a stop in the queue is no request)."""
        return self._submitted - self._taken

    def stop(self) -> None:
        """Abort what still runs, tell the other ranks to stop, release the engine (its shared memory)."""
        self._commands.put(("stop", None, None))
        self._thread.join(STOP_JOIN_S)
        if self._thread.is_alive():
            logger.warning("the engine thread did not stop within %.0f s", STOP_JOIN_S)

    # ------------------------------------------------------------------------------------------ the engine thread
    def _run(self) -> None:
        try:
            self.llm = self._build_llm()
        except BaseException as e:  # a bad model folder: the server exits with its one line
            self.failure = e
            self._on_fatal()
            return
        self.metrics.kv_blocks_total.set(self.llm.block_manager.num_blocks)
        self.ready.set()
        logger.info("the model is loaded; serving")
        try:
            while self._one_iteration():
                pass
        except BaseException as e:  # a failed step or a lost rank: every request hears it, the server stops
            logger.error("the engine failed: %s", e)
            self.failure = e
            self._on_fatal()
        finally:
            why = "the server is shutting down" if self.failure is None else f"the engine failed: {self.failure}"
            for sink in self._sinks.values():
                sink(EngineEvent("failed", message=why))
            self._sinks.clear()
            self.llm.close()

    def _one_iteration(self) -> bool:
        plan = self._next_plan()
        if self.world_size > 1:
            distributed.broadcast_from_rank0(plan)
        if plan.stop:
            return False
        apply_plan(self.llm, plan, self._added, self._aborted)
        if self.llm.has_unfinished():
            self._step()
        self._publish_gauges()
        return True

    def _next_plan(self) -> StepPlan:
        """Every command that arrived; when nothing runs, the first one is waited for (up to a heartbeat), and then
        the requests still being preprocessed beside it (up to ADMISSION_WINDOW_S)."""
        plan = StepPlan()
        idle = not self.llm.has_unfinished()
        self._take(plan, HEARTBEAT_S if idle else None)
        if idle and plan.adds:
            deadline = time.monotonic() + ADMISSION_WINDOW_S
            while not plan.stop and self.preparing > 0 and time.monotonic() < deadline:
                self._take(plan, ADMISSION_POLL_S)
        return plan

    def _take(self, plan: StepPlan, wait: Optional[float]) -> None:
        """Every command queued, into `plan`; with `wait`, the first one waited for up to that many seconds."""
        block = wait is not None
        while not plan.stop:
            try:
                kind, value, sink = self._commands.get(block=block, timeout=wait if block else None)
            except queue.Empty:
                return
            block = False
            if kind == "add":
                self._planned += 1  # (before the queue's count drops, so that it is never missed)
                self._taken += 1
                plan.adds.append(value)
                self._sinks[value.request_id] = sink
            elif kind == "abort":
                plan.aborts.append(value)
            else:
                plan.stop = True

    def _added(self, request_id: int, error: Optional[str]) -> None:
        sink = self._sinks[request_id]
        if error is None:
            sink(EngineEvent("accepted"))
        else:
            del self._sinks[request_id]
            sink(EngineEvent("rejected", message=error))

    def _aborted(self, output) -> None:
        self._sinks.pop(output.request_id, None)  # its handler is gone: nobody to tell
        self.metrics.requests_finished.labels(output.finish_reason).inc()

    def _step(self) -> None:
        llm = self.llm
        before = (llm.tokens_generated, llm.speculative_stats.proposed, llm.speculative_stats.accepted)
        outputs = llm.step()
        # (a drafted step may give a request several tokens)
        self.metrics.generation_tokens.inc(llm.tokens_generated - before[0])
        self.metrics.draft_tokens.inc(llm.speculative_stats.proposed - before[1])
        self.metrics.accepted_tokens.inc(llm.speculative_stats.accepted - before[2])
        for output in outputs:
            sink = self._sinks.get(output.request_id)
            if sink is None:  # aborted meanwhile
                continue
            if output.finished:
                del self._sinks[output.request_id]
                self.metrics.requests_finished.labels(output.finish_reason).inc()
            sink(EngineEvent("output", output=dataclasses.replace(output)))

    def _publish_gauges(self) -> None:
        scheduler, beams = self.llm.scheduler, self.llm.beams  # (a beam search is one request, its beams its own)
        self.num_waiting = len(scheduler.waiting) + len(beams.waiting)
        self.num_running = len(scheduler.running) + len(beams.running)
        self._planned = 0  # (after: those it counted are in the two counts now)
        self.metrics.requests_running.set(self.num_running)
        self.metrics.requests_waiting.set(self.num_waiting + self._in_queue())
        manager = self.llm.block_manager
        self.metrics.kv_blocks_used.set(manager.num_blocks - manager.num_free_blocks)
