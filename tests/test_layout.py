"""The shared output lifecycle (clipbeam.layout) and its storage helpers, on local disk and moto S3."""

from __future__ import annotations

import json
import logging
import os
import socket
import time

import apache_beam as beam
import pytest

from clipbeam import storage
from clipbeam.commands.common import run_pipeline
from clipbeam.errors import UsageError
from clipbeam.layout import (
    LEASE_FILE,
    RUN_RECORD,
    Lease,
    LeaseHeld,
    LeaseLost,
    Mode,
    OutputKind,
    open_output,
    read_lease,
)

KIND = OutputKind("clipbeam.test", markers="_done", scratch=("_scratch/*.bin",))
SETTINGS = {"model": "m", "labels": ["a", "b"]}


@pytest.fixture(params=["local", "s3"])
def place(request, tmp_path):
    """(folder URL, storage_options) on local disk or on the loopback S3 server."""
    if request.param == "local":
        return str(tmp_path / "out"), None
    s3 = request.getfixturevalue("s3_server")
    return f"s3://{s3['bucket']}/out", s3["storage_options"]


def _put(url: str, so, data: bytes = b"x") -> None:
    with storage.atomic_open(url, "wb", so) as handle:
        handle.write(data)


def _tree(url: str, so) -> set[str]:
    fs, root = storage.get_fs(url, so)
    fs.invalidate_cache()
    return {p[len(root.rstrip("/")) + 1:] for p in fs.find(root)} if fs.exists(root) else set()


def _run_once(url, so, settings=SETTINGS, mode=Mode.RESUME, units=("u1", "u2")):
    out = open_output(url, KIND, settings, mode, so)
    with out:
        for unit in units:
            name = f"data/{unit}.bin"
            out.claim([name])
            _put(out.path(name), so)
            out.mark_done(unit, {"rows": 1}, files=[name])
        return out.commit({"units": sorted(out.done_units())})


def test_a_run_marks_units_and_commits_the_manifest_last(place):
    url, so = place
    manifest = _run_once(url, so)
    assert manifest == {"format": "clipbeam.test", "units": ["u1", "u2"]}
    assert _tree(url, so) == {"manifest.json", RUN_RECORD, "_done/u1.json", "_done/u2.json",
                              "data/u1.bin", "data/u2.bin"}  # the lease went with the commit
    # resume with the same settings: the done units are listed, the manifest is removed first
    out = open_output(url, KIND, SETTINGS, Mode.RESUME, so)
    with out:
        assert set(out.done_units()) == {"u1", "u2"}
        assert not storage.exists(out.path("manifest.json"), so)
        assert out.previous_manifest["units"] == ["u1", "u2"]
        storage.remove_if_present(out.path("data/u2.bin"), so)
        assert set(out.done_units()) == {"u1"}  # a unit whose file went is redone


def test_a_run_that_keeps_the_manifest_replaces_it_only_at_commit(place):
    """keep_manifest (index --append): the previous manifest stays readable until the new one replaces it."""
    url, so = place
    _run_once(url, so)
    out = open_output(url, KIND, SETTINGS, Mode.RESUME, so, keep_manifest=True)
    with out:
        assert storage.read_json(out.path("manifest.json"), so)["units"] == ["u1", "u2"]
        _put(out.path("data/u3.bin"), so)
        out.mark_done("u3", {"rows": 1}, files=["data/u3.bin"])
        assert storage.read_json(out.path("manifest.json"), so)["units"] == ["u1", "u2"]
        out.commit({"units": sorted(out.done_units())})
    assert storage.read_json(storage.join(url, "manifest.json"), so)["units"] == ["u1", "u2", "u3"]


def test_resume_with_other_settings_names_the_changed_keys_and_touches_nothing(place):
    url, so = place
    _run_once(url, so)
    before = _tree(url, so)
    with pytest.raises(UsageError) as err:
        open_output(url, KIND, {"model": "m", "labels": ["a", "c"], "top_k": 3}, Mode.RESUME, so)
    message = str(err.value)
    assert "other settings" in message and "labels" in message and "top_k" in message and "model" not in message
    assert "\n" not in message
    assert _tree(url, so) == before


def test_refuse_mode_refuses_an_existing_output(place):
    url, so = place
    _run_once(url, so)
    with pytest.raises(UsageError, match="pass overwrite to replace it"):  # the field; the CLI says --overwrite
        open_output(url, KIND, SETTINGS, Mode.REFUSE, so)


def test_overwrite_deletes_only_the_names_the_job_owns(place):
    url, so = place
    _run_once(url, so)
    for name in ("notes.txt", "data/mine.bin", "data/.u9.bin.tmp-dead"):
        _put(storage.join(url, name), so)
    _put(storage.join(url, "_scratch/frag.bin"), so)
    _run_once(url, so, settings={"model": "other"}, mode=Mode.CLEAR, units=("u3",))
    assert _tree(url, so) == {"manifest.json", RUN_RECORD, "_done/u3.json", "data/u3.bin",
                              "notes.txt", "data/mine.bin"}
    record = storage.read_json(storage.join(url, RUN_RECORD), so)
    assert record["settings"] == {"model": "other"} and record["owned"] == ["data/u3.bin"]


def test_overwrite_deletes_the_jobs_own_scratch_files_not_the_folders(place):
    """Markers and scratch files go by the job's own names (the markers its ledger reads, its scratch
    globs); a file a user put in those folders stays, and so does its folder."""
    url, so = place
    _run_once(url, so)
    for name in ("_scratch/part-1.bin", "_scratch/.part-2.bin.tmp-dead", "_scratch/keep.txt", "_done/README"):
        _put(storage.join(url, name), so)
    _run_once(url, so, settings={"model": "other"}, mode=Mode.CLEAR, units=())
    assert _tree(url, so) == {"manifest.json", RUN_RECORD, "_scratch/keep.txt", "_done/README"}


def test_overwrite_never_deletes_a_listed_name_outside_the_folder(place):
    """Run records, manifests and markers are files anyone with write access can edit: names in them that
    leave the folder ('..', absolute paths, URLs) are neither deleted nor trusted as done units."""
    url, so = place
    _run_once(url, so)
    victim = storage.join(url.rsplit("/", 1)[0], "victim.txt")
    _put(victim, so)
    record = storage.read_json(storage.join(url, RUN_RECORD), so)
    storage.write_json(storage.join(url, RUN_RECORD), dict(record, owned=[*record["owned"], "../victim.txt"]), so)
    storage.write_json(storage.join(url, "_done/evil.json"),
                       {"unit": "evil", "files": ["data/../../victim.txt", "/etc/hostname", victim]}, so)
    out = open_output(url, KIND, SETTINGS, Mode.RESUME, so)
    with out:
        assert sorted(out.done_units()) == ["u1", "u2"]
    _run_once(url, so, mode=Mode.CLEAR, units=("u3",))
    assert storage.exists(victim, so)
    assert "data/u1.bin" not in _tree(url, so)


def test_a_foreign_non_empty_folder_is_refused_untouched(place):
    url, so = place
    _put(storage.join(url, "shard-00000.tar"), so)
    _put(storage.join(url, "photos/a.jpg"), so)
    for mode in Mode:
        with pytest.raises(UsageError, match="holds no clipbeam.test output") as err:
            open_output(url, KIND, SETTINGS, mode, so)
        assert "\n" not in str(err.value)
    assert _tree(url, so) == {"shard-00000.tar", "photos/a.jpg"}


def test_an_output_of_another_kind_is_refused(place):
    url, so = place
    _run_once(url, so)
    with pytest.raises(UsageError, match="holds a clipbeam.test output, not clipbeam.other"):
        open_output(url, OutputKind("clipbeam.other"), SETTINGS, Mode.CLEAR, so)


def test_a_second_run_refuses_while_the_lease_is_live(place):
    url, so = place
    first = open_output(url, KIND, SETTINGS, Mode.RESUME, so)
    with pytest.raises(LeaseHeld, match="being written by another run"):
        open_output(url, KIND, SETTINGS, Mode.RESUME, so)
    first.mark_done("u1", {}, files=[])
    first.commit({})
    assert read_lease(url, so) is None
    _run_once(url, so)  # free again


def test_a_stale_lease_is_taken_over_and_the_old_run_cannot_commit(place, caplog):
    url, so = place
    old = open_output(url, KIND, SETTINGS, Mode.RESUME, so, lease_timeout=600)
    old.lease._stop.set()  # its heartbeat stops, as when the process hangs
    later_time = read_lease(url, so).heartbeat + 601
    later = Lease(url, so, timeout=600, clock=lambda: later_time)
    with caplog.at_level(logging.WARNING, logger="clipbeam"):
        later.acquire()
    assert "taking over the stale lease" in caplog.text
    with pytest.raises(LeaseLost):
        old.ledger.mark_done("u1", {}, files=[])  # a worker of the old run
    with pytest.raises(LeaseLost):
        old.commit({})
    assert not storage.exists(storage.join(url, "manifest.json"), so)
    assert read_lease(url, so).owner == later.owner  # the loser did not remove the winner's lease
    later.release()


def test_a_lease_left_by_a_dead_process_of_this_host_is_taken_over(tmp_path):
    url = str(tmp_path / "out")
    os.makedirs(url)
    dead = {"owner": "x", "host": socket.gethostname(), "pid": 2 ** 22 + 12345, "started": 0,
            "heartbeat": 9e12}  # a heartbeat in the future: only the missing process makes it stale
    with open(os.path.join(url, LEASE_FILE), "w") as handle:
        json.dump(dead, handle)
    _run_once(url, None)
    assert not os.path.exists(os.path.join(url, LEASE_FILE))


def test_exclusive_create_refuses_a_second_writer(place):
    url, so = place
    target = storage.join(url, "lock.json")
    assert storage.create_exclusive(target, b"one", so)
    assert not storage.create_exclusive(target, b"two", so)
    with storage.open_input(target, so) as handle:
        assert handle.read() == b"one"


def test_storage_helpers(place):
    url, so = place
    assert storage.list_names(url, so) == []
    assert not storage.remove_if_present(storage.join(url, "nothing"), so)
    _put(storage.join(url, "a.txt"), so)
    _put(storage.join(url, "sub/b.txt"), so)
    _put(storage.join(url, ".c.txt.tmp-0123"), so)
    assert storage.list_names(url, so) == [".c.txt.tmp-0123", "a.txt", "sub"]
    assert storage.is_temporary(".c.txt.tmp-0123") and not storage.is_temporary("a.txt")
    storage.require_readable_file(storage.join(url, "a.txt"), so)
    with pytest.raises(UsageError, match="does not exist"):
        storage.require_readable_file(storage.join(url, "sub"), so, what="--labels-file")
    assert storage.remove_if_present(storage.join(url, "sub"), so, recursive=True)
    assert storage.list_names(url, so) == [".c.txt.tmp-0123", "a.txt"]


def test_run_pipeline_turns_a_worker_failure_into_exit_1(capsys):
    def explode(value):
        raise OSError(f"disk full at {value}\nsecond line of a long worker traceback")

    pipeline = beam.Pipeline(runner="DirectRunner")
    _ = pipeline | beam.Create([1]) | beam.Map(explode)
    assert run_pipeline(pipeline, "classify") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("clipbeam classify: the run did not finish")
    assert err[0].endswith("rerun the same command to resume")
    ok = beam.Pipeline(runner="DirectRunner")
    _ = ok | beam.Create([1]) | beam.Map(lambda v: v)
    assert run_pipeline(ok, "classify") == 0


def test_the_heartbeat_keeps_a_lease_live_and_stops_once_it_is_lost(tmp_path):
    url = str(tmp_path / "out")
    lease = Lease(url, None, timeout=0.2).acquire()
    first = read_lease(url, None).heartbeat
    deadline = time.monotonic() + 20
    while read_lease(url, None).heartbeat == first:  # refreshed by the background thread
        assert time.monotonic() < deadline, "the heartbeat never moved"
        time.sleep(0.05)
    thief = {"owner": "other:1:x", "host": "other", "pid": 1, "started": 0, "heartbeat": 1.0}
    beat = lease._thread
    for _ in range(100):  # (rewritten if a beat already under way put ours back)
        storage.write_json(storage.join(url, LEASE_FILE), thief, None)
        beat.join(timeout=0.2)  # the heartbeat sees the other owner and stops
        if not beat.is_alive():
            break
    assert not beat.is_alive()
    assert read_lease(url, None).owner == "other:1:x"
    with pytest.raises(LeaseLost):
        lease.check()
    lease.release()
    assert read_lease(url, None).owner == "other:1:x"  # release never removes another run's lease
