"""Preprocessing once per node: under tensor parallelism only the node's leader rank decodes and resizes media;
the other ranks of the node read the pixel tensors from POSIX shared memory (`shm.py`) and the rest of the
prompt from a small object collective. With one rank it is a plain loop over the Preprocessor."""
import dataclasses
import logging
import os

from atb_models import distributed
from atb_models.errors import UserError
from atb_models.multimodal.shm import (
    SharedTensorPublisher,
    install_cleanup,
    log_removed_segments,
    read_shared_tensor,
    remove_stale_segments,
)
from atb_models.ranks import ParallelState

logger = logging.getLogger(__name__)


def node_name_file(path: str, state: ParallelState) -> str:
    """The live-segment list of this node: --shm_name_save_path itself on the first node, a sibling file on the
    others (the path may lie on a filesystem the nodes share)."""
    node = state.rank // state.local_world_size
    return path if node == 0 else f"{path}.node{node}"


class NodePreprocessor:
    def __init__(self, preprocessor, state: ParallelState, shm_name_file: str):
        self.preprocessor = preprocessor
        self.state = state
        self.publisher = None
        if not state.is_leader:
            return
        name_file = node_name_file(shm_name_file, state)
        if state.world_size > 1 and state.local_world_size > 1:
            self.publisher = SharedTensorPublisher(name_file)
            install_cleanup(self.publisher)
        elif os.path.lexists(name_file):
            # No segments to share, but a killed earlier run's may be listed there: a new run removes them too.
            try:
                log_removed_segments(remove_stale_segments(name_file))
            except UserError as error:  # the file is not needed here: a foreign one is only worth a warning
                logger.warning("%s", error)

    def _run_all(self, requests: list) -> list:
        results = []
        for request in requests:
            try:
                results.append(self.preprocessor(request))
            except UserError as e:
                results.append(e)
        return results

    def __call__(self, requests: list) -> list:
        """A ProcessedPrompt, or the UserError that request raised, for each request; the same on every rank."""
        if self.state.world_size == 1 or self.state.local_world_size == 1:
            return self._run_all(requests)
        local, payload, handles = None, None, []
        if self.state.is_leader:
            local = self._run_all(requests)
            payload = []
            try:
                for result in local:
                    if isinstance(result, UserError):
                        payload.append(str(result))
                        continue
                    shared = []
                    for visual in result.visuals:
                        handles.append(self.publisher.publish(visual.pixel_values))
                        shared.append(dataclasses.replace(visual, pixel_values=handles[-1]))
                    payload.append(dataclasses.replace(result, visuals=shared))
            except BaseException:  # this batch's segments go now, not at exit; the rank's failure ends the job
                self.publisher.release(handles)
                raise
        payload = distributed.gather_objects(payload)[self.state.node_leader]
        if local is None:
            local = []
            for item in payload:
                if isinstance(item, str):
                    local.append(UserError(item))
                    continue
                visuals = [dataclasses.replace(v, pixel_values=read_shared_tensor(v.pixel_values))
                           for v in item.visuals]
                local.append(dataclasses.replace(item, visuals=visuals))
        # Every rank of the node has its copy now: the segments can go.
        distributed.barrier()
        if self.publisher is not None:
            self.publisher.release(handles)
        return local

    def close(self) -> None:
        if self.publisher is not None:
            self.publisher.close()
