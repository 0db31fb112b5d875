"""Atomic outputs: a folder is written beside its target and renamed into place. Killed (SIGKILL) mid-write, failing
part-way or on a full disk, the previous output stays byte for byte; the next write tidies what the kill left."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from pipeline import prepare
from pipeline.core import atomic
from pipeline.core.errors import StageError
from pipeline.core.paths import ROOT


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def leftovers(target: Path) -> list[str]:
    return sorted(p.name for p in target.parent.iterdir() if p.name.startswith(f".{target.name}."))


@pytest.fixture
def previous(tmp_path) -> Path:
    """An earlier output: two files in `out/`."""
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o750)
    (out / "manifest.json").write_text('{"rows": 3}\n', encoding="utf-8")
    (out / "pool.jsonl").write_text('{"text": "你好，世界！"}\n' * 3, encoding="utf-8")
    return out


def test_the_new_folder_replaces_the_previous_one_whole(previous):
    with atomic.replacing(previous, marker="manifest.json") as tmp:
        assert tmp.parent == previous.parent and tmp != previous
        (tmp / "manifest.json").write_text('{"rows": 1}\n', encoding="utf-8")
    assert snapshot(previous) == {"manifest.json": b'{"rows": 1}\n'}  # the old pool.jsonl went with the old folder
    assert leftovers(previous) == [] and previous.stat().st_mode & 0o777 == 0o750
    fresh = previous.parent / "new" / "deeper"
    with atomic.replacing(fresh) as tmp:
        (tmp / "x").write_text("x")
    assert (fresh / "x").read_text() == "x" and fresh.stat().st_mode & 0o077  # not mkdtemp's 0700


def test_an_error_part_way_leaves_the_previous_output_byte_for_byte(previous):
    before = snapshot(previous)
    with pytest.raises(RuntimeError, match="serialising failed"), atomic.replacing(previous) as tmp:
        (tmp / "manifest.json").write_text("{}", encoding="utf-8")
        raise RuntimeError("serialising failed")
    assert snapshot(previous) == before and leftovers(previous) == []


KILLED_MID_WRITE = """
import sys, time
from pathlib import Path
from pipeline.core import atomic
with atomic.replacing(Path(sys.argv[1])) as tmp:
    (tmp / "manifest.json").write_text('{"rows": 999}')
    with open(tmp / "pool.jsonl", "wb") as f:
        f.write(b'{"text": "half a ro')
        f.flush()
        print("writing", flush=True)
        time.sleep(60)
"""


def test_sigkill_mid_write_leaves_the_previous_output_and_the_next_write_tidies_up(previous):
    before = snapshot(previous)
    proc = subprocess.Popen([sys.executable, "-c", KILLED_MID_WRITE, str(previous)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert proc.stdout.readline().strip() == "writing"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert snapshot(previous) == before  # what a later stage reads is the whole previous output
    (left,) = leftovers(previous)
    assert left.startswith(f".out.partial-{proc.pid}-")
    with atomic.replacing(previous) as tmp:  # the next write removes the dead process's partial folder
        (tmp / "manifest.json").write_text("{}")
    assert leftovers(previous) == [] and snapshot(previous) == {"manifest.json": b"{}"}


KILLED_BETWEEN_RENAMES = """
import os, signal, sys
from pathlib import Path
from pipeline.core import atomic
atomic._exchange = lambda a, b: False  # a system without renameat2: old folder aside, new one in
rename, calls = os.rename, []
def dying_rename(src, dst):
    calls.append(src)
    if len(calls) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    rename(src, dst)
os.rename = dying_rename
with atomic.replacing(Path(sys.argv[1])) as tmp:
    (tmp / "manifest.json").write_text("{}")
"""


def test_a_kill_between_the_two_renames_of_the_fallback_is_undone_next_time(previous):
    before = snapshot(previous)
    proc = subprocess.run([sys.executable, "-c", KILLED_BETWEEN_RENAMES, str(previous)], timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == -signal.SIGKILL
    assert not previous.exists()  # missing, never half: a later stage says it is missing
    assert sorted(n.split("-")[0] for n in leftovers(previous)) == [".out.old", ".out.partial"]
    atomic.recover(previous)
    assert snapshot(previous) == before and leftovers(previous) == []


def test_a_file_or_a_folder_of_other_things_is_refused_before_anything_is_written(tmp_path):
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(StageError, match="is a file, not a folder"), atomic.replacing(tmp_path / "a-file"):
        pass
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("x")
    with pytest.raises(StageError, match=r"holds other files and is not a prepared pool folder \(no manifest.json\)"):
        atomic.check_replaceable(tmp_path / "mine", "manifest.json", "prepared pool")
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "x"


def test_a_full_disk_is_named_also_when_a_library_wraps_the_os_error(previous):
    before = snapshot(previous)
    wrapped = "Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: \"No space left on device\" })"
    for err in (OSError(errno.ENOSPC, "No space left on device"), OSError(errno.EDQUOT, "Disk quota exceeded"),
                RuntimeError(wrapped)):
        with pytest.raises(StageError) as info, atomic.replacing(previous, what="merged model") as tmp:
            (tmp / "model.safetensors").write_bytes(b"\0" * 100)
            raise err
        text = str(info.value)
        assert text.startswith(f"disk full at {previous.parent} (") and "free) while writing the merged model" in text
        assert "Free space, or set output_dir" in text and "previous merged model there is untouched" in text
        assert snapshot(previous) == before and leftovers(previous) == []
    assert not atomic.is_disk_full(RuntimeError("shape mismatch"))


# ------------------------------------------------------------------------------------------------------------------
# A real stage on a full disk: a tiny tmpfs where this machine lets us mount one, else the write raises ENOSPC
# ------------------------------------------------------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    root = tmp_path / "small-disk"
    root.mkdir()
    mounted = False
    if hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("mount"):
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(root)],
                                 capture_output=True).returncode == 0
    yield root, mounted
    if mounted:
        subprocess.run(["umount", "-l", str(root)], capture_output=True)


def fill(root: Path, leave: int) -> None:
    """Take the free space of the file system at root down to about `leave` bytes."""
    free = shutil.disk_usage(root).free
    with open(root / "filler", "wb") as f:
        f.write(b"\0" * max(0, free - leave))


def test_prepare_on_a_full_disk_fails_the_run_naming_the_folder_and_keeps_the_previous_pool(
        small_disk, mlflow_store, monkeypatch, capsys):
    root, mounted = small_disk
    out = root / "data"
    argv = ["--hw", "cpu", "--dry-run", "false", "--set", f"output_dir={out}"]
    assert prepare.main(argv) == 0
    before = snapshot(out)
    if mounted:
        fill(root, leave=48 * 1024)  # the pools need ~180 KiB
    else:  # no tmpfs here: the pool writer fills "the disk" part-way through its second file
        from pipeline.data import pool

        write, calls = pool.write_jsonl, []

        def full(ds, path, kind):
            calls.append(path)
            if len(calls) == 2:
                path.write_bytes(b'{"id": "half a ro')
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
            return write(ds, path, kind)

        monkeypatch.setattr(pool, "write_jsonl", full)
    capsys.readouterr()
    assert prepare.main(argv) == 1
    err = capsys.readouterr().err
    assert f"disk full at {root} (" in err and "set output_dir" in err, err
    assert snapshot(out) == before  # the previous pool, byte for byte
    assert sorted(p.name for p in root.iterdir()) == (["data", "filler"] if mounted else ["data"])
    (run,) = mlflow.search_runs(experiment_names=["zh-align-test"], order_by=["start_time DESC"], max_results=1,
                                output_format="list")
    assert run.info.status == "FAILED" and run.data.tags["error"].startswith(f"StageError: disk full at {root}")


def test_a_pull_that_fills_the_disk_part_way_keeps_the_previous_dest(tmp_path, monkeypatch):
    """`make pull OVERWRITE=1` onto a folder that holds an earlier pull: the copy dies of ENOSPC half-way, the earlier
    model stays whole (the registry lookup and download are stood in for; the copy and the swap are real)."""
    from types import SimpleNamespace

    from pipeline.tracking import model_registry

    dest = tmp_path / "pulled"
    dest.mkdir()
    (dest / "config.json").write_text('{"model_type": "qwen2"}')
    (dest / "model.safetensors").write_bytes(b"old weights")
    before = snapshot(dest)

    def download(source, dst_path):
        model = Path(dst_path) / "artifacts" / "model"
        model.mkdir(parents=True)
        (model / "config.json").write_text('{"model_type": "qwen2", "new": true}')
        (model / "model.safetensors").write_bytes(b"new weights" * 1000)
        return str(Path(dst_path))

    copytree = shutil.copytree

    def copy_until_full(src, dst, **kw):
        if Path(src).name == "model.safetensors":
            Path(dst).write_bytes(Path(src).read_bytes()[:100])
            raise OSError(errno.ENOSPC, "No space left on device", str(dst))
        return shutil.copy2(src, dst, **kw)

    monkeypatch.setattr(model_registry, "registered_version",
                        lambda client, ref: SimpleNamespace(source="models:/m/1", tags={}, name="m", version="1"))
    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", download)
    monkeypatch.setattr(mlflow, "MlflowClient", lambda *args, **kw: None)
    monkeypatch.setattr(mlflow, "set_tracking_uri", lambda uri: None)
    monkeypatch.setattr(shutil, "copytree", lambda src, dst, **kw: copytree(src, dst, copy_function=copy_until_full, **kw))
    with pytest.raises(StageError, match=rf"^disk full at {tmp_path} \(.* while writing the pulled model"):
        model_registry.pull("m/1", dest, overwrite=True)
    assert snapshot(dest) == before and leftovers(dest) == []
    monkeypatch.setattr(shutil, "copytree", copytree)
    model_registry.pull("m/1", dest, overwrite=True)
    assert (dest / "model.safetensors").read_bytes() == b"new weights" * 1000 and leftovers(dest) == []
