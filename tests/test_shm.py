"""Shared-memory transport: tensors round-trip exactly, a bad read raises, and no exit path but SIGKILL leaves a
segment in /dev/shm (and after SIGKILL the name file is enough to remove it)."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from atb_models.errors import UserError
from atb_models.multimodal import shm
from atb_models.multimodal.shm import (
    SharedMemoryError,
    SharedTensorHandle,
    SharedTensorPublisher,
    install_cleanup,
    read_shared_tensor,
    remove_stale_segments,
)

REPO = Path(__file__).resolve().parents[1]
DEV_SHM = Path("/dev/shm")
CHILD_ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}

pytestmark = pytest.mark.skipif(not DEV_SHM.is_dir(), reason="needs /dev/shm to observe segments")


def segments(prefix: str) -> list[str]:
    return sorted(name for name in os.listdir(DEV_SHM) if name.startswith(prefix))


def listed(name_file) -> list[str]:
    """The segment names a name file lists, its header checked."""
    header, *names = Path(name_file).read_text().splitlines()
    assert header == shm.NAME_FILE_HEADER
    return names


@pytest.fixture
def publisher(tmp_path):
    with SharedTensorPublisher(tmp_path / "shm_names.txt") as publisher:
        yield publisher
    assert segments(publisher.prefix) == []


@pytest.mark.parametrize("tensor", [
    torch.randn(7, 1176),
    torch.randint(0, 256, (3, 1176), dtype=torch.uint8),
    torch.randn(2, 3, 4),
    torch.tensor(1.5),
    torch.randn(6, 4)[:, ::2],
    torch.randn(5, 3).bfloat16(),
    torch.empty(0, 1176),
    torch.empty(0, dtype=torch.uint8),
], ids=["float32_patches", "uint8_patches", "3d", "scalar", "non_contiguous", "bfloat16", "empty", "empty_uint8"])
def test_round_trip_is_exact_for_any_shape_and_dtype(publisher, tensor):
    handle = publisher.publish(tensor)
    copy = read_shared_tensor(handle)
    assert copy.dtype == tensor.dtype and copy.shape == tensor.shape
    assert torch.equal(copy, tensor)
    assert copy.is_contiguous()


def test_empty_tensors_use_no_segment(publisher):
    handle = publisher.publish(torch.empty(0, 1176))
    assert handle.name == "" and handle.nbytes == 0
    assert publisher.live_names == [] and segments(publisher.prefix) == []


def test_handle_is_small_and_picklable(publisher):
    handle = publisher.publish(torch.randn(100, 1176))
    assert pickle.loads(pickle.dumps(handle)) == handle
    assert len(pickle.dumps(handle)) < 300


def test_read_copy_owns_its_memory(publisher):
    tensor = torch.randn(4, 1176)
    handle = publisher.publish(tensor)
    copy = read_shared_tensor(handle)
    publisher.release([handle])
    assert torch.equal(copy, tensor)


READER = """
import json, sys, torch
from atb_models.multimodal.shm import SharedTensorHandle, read_shared_tensor
handles = [SharedTensorHandle(**{**fields, "shape": tuple(fields["shape"])}) for fields in json.loads(sys.argv[1])]
torch.save([read_shared_tensor(handle) for handle in handles], sys.argv[2])
"""


def test_reader_in_another_process_reads_and_its_exit_leaves_the_segment(publisher, tmp_path):
    tensors = [torch.randn(9, 1176), torch.arange(300, dtype=torch.uint8).reshape(3, 100)]
    handles = [publisher.publish(tensor) for tensor in tensors]
    out = tmp_path / "read.pt"
    result = subprocess.run(
        [sys.executable, "-c", READER, json.dumps([dataclasses.asdict(h) for h in handles]), str(out)],
        env=CHILD_ENV, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "resource_tracker" not in result.stderr
    for copy, tensor in zip(torch.load(out), tensors):
        assert torch.equal(copy, tensor)
    # A SharedMemory-based reader would have its resource tracker unlink the leader's segment just after exit.
    assert segments(publisher.prefix) == sorted(h.name for h in handles)
    assert torch.equal(read_shared_tensor(handles[0]), tensors[0])


def test_corrupted_segment_raises_checksum_mismatch(publisher):
    handle = publisher.publish(torch.zeros(4, 1176))
    with open(DEV_SHM / handle.name, "r+b") as segment:
        segment.seek(100)
        segment.write(b"\x01")
    with pytest.raises(SharedMemoryError, match=rf"segment {handle.name}: checksum mismatch"):
        read_shared_tensor(handle)


def test_wrong_checksum_in_handle_raises(publisher):
    handle = publisher.publish(torch.randn(4, 1176))
    with pytest.raises(SharedMemoryError, match="checksum mismatch"):
        read_shared_tensor(dataclasses.replace(handle, crc32=handle.crc32 ^ 1))


def test_released_segment_raises_not_found(publisher):
    handle = publisher.publish(torch.randn(4, 1176))
    publisher.release([handle])
    with pytest.raises(SharedMemoryError, match=rf"segment {handle.name}: not found"):
        read_shared_tensor(handle)


def test_size_mismatch_raises(publisher):
    handle = publisher.publish(torch.randn(4, 1176))
    with pytest.raises(SharedMemoryError, match="holds 18816 bytes, the handle says 37632"):
        read_shared_tensor(dataclasses.replace(handle, shape=(8, 1176), nbytes=37632))
    with pytest.raises(SharedMemoryError, match="handle says 100 bytes"):
        read_shared_tensor(dataclasses.replace(handle, nbytes=100))


def test_foreign_segment_names_are_refused():
    handle = SharedTensorHandle(name="psm_1a2b3c4d", shape=(1,), dtype="float32", nbytes=4, crc32=0)
    with pytest.raises(SharedMemoryError, match="not a segment name of this kit"):
        read_shared_tensor(handle)


def test_name_file_lists_exactly_the_live_segments(publisher):
    name_file = Path(publisher.name_file)
    assert listed(name_file) == []
    handles = [publisher.publish(torch.randn(2, 1176)) for _ in range(3)]
    assert listed(name_file) == [h.name for h in handles] == segments(publisher.prefix)
    publisher.release(handles[1:2])
    assert listed(name_file) == [handles[0].name, handles[2].name] == segments(publisher.prefix)
    publisher.release(handles)  # releasing twice is harmless
    assert listed(name_file) == [] and segments(publisher.prefix) == []


def test_close_removes_every_segment_and_the_name_file_and_is_idempotent(tmp_path):
    name_file = tmp_path / "shm_names.txt"
    publisher = SharedTensorPublisher(name_file)
    for _ in range(3):
        publisher.publish(torch.randn(2, 1176))
    assert len(segments(publisher.prefix)) == 3
    publisher.close()
    assert segments(publisher.prefix) == [] and not name_file.exists()
    publisher.close()
    with pytest.raises(ValueError, match="closed"):
        publisher.publish(torch.randn(1))


def test_oversized_tensor_is_refused_before_any_segment(publisher, monkeypatch):
    monkeypatch.setattr(shm, "MAX_SEGMENT_BYTES", 1000)
    with pytest.raises(SharedMemoryError, match="4704 bytes, over the 1000-byte limit"):
        publisher.publish(torch.randn(1, 1176))
    assert segments(publisher.prefix) == [] and listed(publisher.name_file) == []


def test_full_dev_shm_is_a_clear_error_and_leaves_nothing(publisher, monkeypatch):
    def no_space(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", no_space)
    with pytest.raises(SharedMemoryError, match=r"cannot allocate 4704 bytes: No space left on device .*--shm-size"):
        publisher.publish(torch.randn(1, 1176))
    assert segments(publisher.prefix) == [] and listed(publisher.name_file) == []


def test_unwritable_name_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="cannot write the shared-memory name file"):
        SharedTensorPublisher(tmp_path / "missing_dir" / "shm_names.txt")


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", ""])
    process.wait()
    return process.pid


def test_a_damaged_list_naming_an_impossible_pid_is_cleaned_not_a_crash(tmp_path):
    name_file = tmp_path / "shm_name.txt"
    name_file.write_text(f"{shm.NAME_FILE_HEADER}\n{shm.SEGMENT_PREFIX}99999999999999999999_ab_0\n")
    assert remove_stale_segments(name_file) == [] and not name_file.exists()


def test_new_publisher_clears_segments_a_dead_run_listed_and_ignores_foreign_names(tmp_path):
    name_file = tmp_path / "shm_names.txt"
    stale = f"{shm.SEGMENT_PREFIX}{dead_pid()}_0badc0de_0"
    shm._create_segment(stale, torch.zeros(8, dtype=torch.uint8))
    name_file.write_text(f"{shm.NAME_FILE_HEADER}\n{stale}\npsm_1a2b3c4d\n../etc/passwd\n")
    with SharedTensorPublisher(name_file) as publisher:
        assert segments(stale) == []
        assert listed(name_file) == []
        assert publisher.live_names == []


def test_stale_cleanup_leaves_a_live_process_segments_alone(publisher):
    handle = publisher.publish(torch.randn(2, 1176))
    assert remove_stale_segments(publisher.name_file) == []
    assert segments(publisher.prefix) == [handle.name]
    assert listed(publisher.name_file) == [handle.name]


def test_install_cleanup_replaces_default_handlers_only_and_close_restores_them(tmp_path):
    previous_hup = signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as under nohup
    previous_term = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    # Python's own SIGINT handler, whatever this test process inherited (a background job starts with SIG_IGN).
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        publisher = SharedTensorPublisher(tmp_path / "shm_names.txt")
        install_cleanup(publisher)
        assert signal.getsignal(signal.SIGTERM) is shm._close_and_exit
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        publisher.close()
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    finally:
        signal.signal(signal.SIGHUP, previous_hup)
        signal.signal(signal.SIGTERM, previous_term)
        signal.signal(signal.SIGINT, previous_int)


# A node leader that publishes one tensor, says so, and waits for a line on stdin: "raise" makes it fail.
# Signals are set as a terminal session would have them, whatever this test process inherited.
LEADER = """
import json, signal, sys, torch
from atb_models.multimodal.shm import SharedTensorPublisher, install_cleanup
signal.signal(signal.SIGINT, signal.default_int_handler)
for signum in (signal.SIGTERM, signal.SIGHUP):
    signal.signal(signum, signal.SIG_DFL)
publisher = SharedTensorPublisher(sys.argv[1])
install_cleanup(publisher)
handle = publisher.publish(torch.arange(12, dtype=torch.float32))
print(json.dumps({"prefix": publisher.prefix, "name": handle.name}), flush=True)
if sys.stdin.readline().strip() == "raise":
    raise RuntimeError("preprocessing failed")
"""

ENDINGS = {  # how the leader ends -> its exit status
    "exit": 0,
    "raise": 1,
    "sigterm": 128 + signal.SIGTERM,
    "sighup": 128 + signal.SIGHUP,
    "sigint": -signal.SIGINT,  # KeyboardInterrupt, then Python ends itself by SIGINT as usual
    "sigkill": -signal.SIGKILL,
}


@pytest.fixture(scope="module")
def leaders(tmp_path_factory):
    """One leader process per ending, all started at once (each spends most of its start importing torch)."""
    started = {}
    for ending in ENDINGS:
        name_file = tmp_path_factory.mktemp(ending) / "shm_names.txt"
        process = subprocess.Popen([sys.executable, "-c", LEADER, str(name_file)], env=CHILD_ENV, text=True,
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        started[ending] = (process, name_file)
    yield started
    for process, name_file in started.values():
        with process:  # closes its pipes
            process.kill()
        remove_stale_segments(name_file)


@pytest.mark.parametrize("ending", ["exit", "raise", "sigterm", "sighup", "sigint"])
def test_leader_leaves_no_segment_whichever_way_it_ends(leaders, ending):
    process, name_file = leaders[ending]
    ready = json.loads(process.stdout.readline() or "null")
    assert ready, process.stderr.read()
    assert segments(ready["prefix"]) == [ready["name"]]
    assert listed(name_file) == [ready["name"]]

    if ending in ("exit", "raise"):
        process.stdin.write(f"{ending}\n")
        process.stdin.flush()
    else:
        process.send_signal(getattr(signal, ending.upper()))
    assert process.wait(timeout=30) == ENDINGS[ending]
    stderr = process.stderr.read()
    if ending in ("exit", "sigterm", "sighup"):
        assert stderr == ""
    assert "resource_tracker" not in stderr and "Exception ignored" not in stderr
    assert segments(ready["prefix"]) == []
    assert not name_file.exists()


def test_after_sigkill_the_name_file_is_enough_to_remove_the_segment(leaders):
    process, name_file = leaders["sigkill"]
    ready = json.loads(process.stdout.readline() or "null")
    assert ready, process.stderr.read()
    process.kill()
    assert process.wait(timeout=30) == ENDINGS["sigkill"]
    assert segments(ready["prefix"]) == [ready["name"]]
    assert remove_stale_segments(name_file) == [ready["name"]]
    assert segments(ready["prefix"]) == [] and not name_file.exists()


# ---------------------------------------------------------------------------- the name file: ours only, shared

FOREIGN = {
    "notes": b"my notes, not a name file\n\x00\xff",
    "empty": b"",
    "headerless_names": b"atbm_1_0badc0de_0\n",  # what the kit wrote before the header existed
}


def node_state(world_size: int):
    """The parallel state of a node leader with `world_size` ranks on its node."""
    from atb_models.ranks import ParallelState

    return ParallelState(rank=0, world_size=world_size, local_rank=0, local_world_size=world_size)


@pytest.mark.parametrize("contents", FOREIGN.values(), ids=FOREIGN.keys())
def test_a_file_without_the_header_is_refused_by_a_publisher_and_by_cleanup_and_left_byte_for_byte(tmp_path,
                                                                                                    contents):
    from atb_models.multimodal.node_share import NodePreprocessor

    name_file = tmp_path / "notes.txt"
    name_file.write_bytes(contents)
    with pytest.raises(UserError, match=rf"--shm_name_save_path {name_file} is not a shared-memory name file of "
                                        rf"this kit .*left untouched"):
        NodePreprocessor(None, node_state(2), str(name_file))  # the node leader of a world-size-2 run
    with pytest.raises(UserError, match="is not a shared-memory name file of this kit"):
        remove_stale_segments(name_file)
    assert name_file.read_bytes() == contents
    assert os.listdir(tmp_path) == ["notes.txt"]


def test_cleanup_shm_refuses_a_foreign_file_in_one_line_and_leaves_it(tmp_path, capsys):
    from examples.models.qwen2_vl.run_pa import main

    name_file = tmp_path / "shm_name.txt"
    name_file.write_bytes(FOREIGN["notes"])
    assert main(["--cleanup_shm", "--shm_name_save_path", str(name_file)]) == 1
    error = capsys.readouterr().err
    assert error.startswith(f"Error: --shm_name_save_path {name_file} is not a shared-memory name file")
    assert error.count("\n") == 1
    assert name_file.read_bytes() == FOREIGN["notes"]


@pytest.mark.parametrize("kind", ["symlink", "directory", "fifo"])
def test_what_is_not_a_regular_file_is_refused_without_being_opened(tmp_path, kind):
    target = tmp_path / "target.txt"
    target.write_bytes(b"keep me\n")
    name_file = tmp_path / "shm_name.txt"
    if kind == "symlink":
        name_file.symlink_to(target)
    elif kind == "directory":
        name_file.mkdir()
    else:
        os.mkfifo(name_file)  # opening it to read would block
    with pytest.raises(UserError, match=f"--shm_name_save_path {name_file} is "):
        SharedTensorPublisher(name_file)
    with pytest.raises(UserError, match=f"--shm_name_save_path {name_file} is "):
        remove_stale_segments(name_file)
    assert target.read_bytes() == b"keep me\n"
    assert sorted(os.listdir(tmp_path)) == ["shm_name.txt", "target.txt"]


def test_two_publishers_on_one_name_file_keep_each_others_names(tmp_path):
    name_file = tmp_path / "shm_name.txt"
    first = SharedTensorPublisher(name_file)
    a = [first.publish(torch.randn(2, 8)) for _ in range(2)]
    second = SharedTensorPublisher(name_file)  # a second run in the same folder: the first one's names stay
    b = second.publish(torch.randn(2, 8))
    assert listed(name_file) == [a[0].name, a[1].name, b.name]
    first.release(a[:1])
    assert listed(name_file) == [b.name, a[1].name]
    first.close()  # the second run is still listed: the file stays
    assert listed(name_file) == [b.name] and segments(first.prefix) == []
    second.close()
    assert not name_file.exists() and segments(second.prefix) == []
    assert os.listdir(tmp_path) == []  # no temporary file left behind


def test_cleanup_finds_the_segments_of_every_killed_run_that_shared_the_name_file(tmp_path, monkeypatch):
    name_file = tmp_path / "shm_name.txt"
    first, second = SharedTensorPublisher(name_file), SharedTensorPublisher(name_file)
    names = [first.publish(torch.randn(3)).name, second.publish(torch.randn(3)).name,
             first.publish(torch.randn(3)).name]
    monkeypatch.setattr(shm, "_process_alive", lambda pid: False)  # both runs were SIGKILLed
    assert sorted(remove_stale_segments(name_file)) == sorted(names)
    assert segments(first.prefix) == segments(second.prefix) == [] and not name_file.exists()
    first.close(), second.close()
    assert os.listdir(tmp_path) == []


def test_cleanup_shm_also_clears_the_lists_of_a_jobs_other_nodes(tmp_path, capsys):
    from examples.models.qwen2_vl.run_pa import main

    name_file = tmp_path / "shm_name.txt"
    stale = [f"{shm.SEGMENT_PREFIX}{dead_pid()}_0badc0de_{i}" for i in range(2)]
    for name, path in zip(stale, (name_file, tmp_path / "shm_name.txt.node1")):
        shm._create_segment(name, torch.zeros(8, dtype=torch.uint8))
        path.write_text(f"{shm.NAME_FILE_HEADER}\n{name}\n")
    assert main(["--cleanup_shm", "--shm_name_save_path", str(name_file)]) == 0
    assert [segments(name) for name in stale] == [[], []] and os.listdir(tmp_path) == []
    assert "listed in " + str(tmp_path / "shm_name.txt.node1") in capsys.readouterr().out


def test_publishers_changing_one_name_file_at_once_lose_no_name(tmp_path):
    import threading

    name_file = tmp_path / "shm_name.txt"
    publishers = [SharedTensorPublisher(name_file) for _ in range(3)]

    def churn(publisher):
        for i in range(40):
            handle = publisher.publish(torch.randn(1))
            if i % 2:
                publisher.release([handle])

    threads = [threading.Thread(target=churn, args=(publisher,)) for publisher in publishers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(listed(name_file)) == sorted(name for p in publishers for name in p.live_names)
    assert len(listed(name_file)) == 3 * 20
    for publisher in publishers:
        publisher.close()
    assert os.listdir(tmp_path) == []


def test_close_from_a_signal_handler_in_the_middle_of_a_name_file_change_does_not_wait_for_its_own_lock(
        tmp_path, monkeypatch):
    publisher = SharedTensorPublisher(tmp_path / "shm_name.txt")
    install_cleanup(publisher)
    handle = publisher.publish(torch.randn(4))
    replace = shm._replace_name_file

    def signal_arrives(path, names):  # SIGTERM while the name file is locked for a change
        shm._close_and_exit(signal.SIGTERM, None)
        replace(path, names)

    monkeypatch.setattr(shm, "_replace_name_file", signal_arrives)
    monkeypatch.setattr(shm, "NAME_FILE_LOCK_TIMEOUT_S", 2.0)  # waiting on our own lock would fail, not hang
    with pytest.raises(SystemExit) as exit_info:
        publisher.publish(torch.randn(4))
    assert exit_info.value.code == 128 + signal.SIGTERM
    assert segments(publisher.prefix) == []
    assert listed(tmp_path / "shm_name.txt") == [handle.name]  # stale names, dropped by the next run or cleanup
    assert os.listdir(tmp_path) == ["shm_name.txt"]


def test_a_world_size_1_run_removes_the_stale_segments_listed_at_the_path(tmp_path):
    from atb_models.multimodal.node_share import NodePreprocessor

    name_file = tmp_path / "shm_name.txt"
    NodePreprocessor(None, node_state(1), str(name_file))
    assert not name_file.exists()  # no name file at world size 1

    stale = f"{shm.SEGMENT_PREFIX}{dead_pid()}_0badc0de_0"
    shm._create_segment(stale, torch.zeros(8, dtype=torch.uint8))
    name_file.write_text(f"{shm.NAME_FILE_HEADER}\n{stale}\n")
    NodePreprocessor(None, node_state(1), str(name_file))
    assert segments(stale) == [] and not name_file.exists()


def test_a_world_size_1_run_warns_about_a_foreign_file_at_the_path_and_leaves_it(tmp_path, caplog):
    from atb_models.multimodal.node_share import NodePreprocessor

    name_file = tmp_path / "shm_name.txt"
    name_file.write_bytes(FOREIGN["notes"])
    NodePreprocessor(None, node_state(1), str(name_file))
    assert "is not a shared-memory name file of this kit" in caplog.text
    assert name_file.read_bytes() == FOREIGN["notes"]
