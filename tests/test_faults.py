"""Faults that are not bad input files: a full disk, permissions, out-of-range options,
degenerate images, a kill in mid-run, errors seen through Snakemake, plain readers."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile

from cryomatch import workflow
from cryomatch.cli import main
from cryomatch.io import atomic
from cryomatch.io.mrc import StackWriter, read_volume, write_mrc
from cryomatch.io.star import read_star, write_star
from workflow_helpers import (
    REPO,
    TINY,
    command,
    snakemake,
    truncated_stack_config,
    write_config,
)

ROOT = os.geteuid() == 0


def _cli(*args, user: str | None = None, cwd=None):
    """``cryomatch ARGS`` in a fresh interpreter (as ``user`` through setpriv when root)."""
    cmd = [sys.executable, "-m", "cryomatch", *map(str, args)]
    env = {**os.environ, "PYTHONPATH": str(REPO / "lib"), "OPENBLAS_NUM_THREADS": "1"}
    if user:  # a home it may write (matplotlib's cache)
        env = {**env, "HOME": tempfile.gettempdir(), "MPLCONFIGDIR": tempfile.gettempdir()}
        cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd)


def _one_line(out, status=None):
    """The stderr of a failed command: one `cryomatch: error:` line (warnings may precede)."""
    assert out.returncode != 0 and 1 <= out.returncode <= 125, out
    if status is not None:
        assert out.returncode == status, out
    lines = [x for x in out.stderr.splitlines() if not x.startswith("cryomatch: warning:")]
    assert len(lines) == 1 and lines[0].startswith("cryomatch: error: "), out.stderr
    return lines[0]


def _files(folder: Path) -> list[Path]:
    return (
        sorted(p for p in Path(folder).rglob("*") if p.is_file()) if Path(folder).exists() else []
    )


# --- 2. disk full, permissions: one line naming the file, nothing left, no signal ----------
@pytest.fixture
def tiny_disk(tmp_path):
    """A folder on a tmpfs of 256 KiB (root only: mount), and a file filling it up to the
    given free KiB."""
    if not ROOT or not shutil.which("mount"):
        pytest.skip("mounting a small tmpfs needs root")
    folder = tmp_path / "disk"
    folder.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(folder)])
    if done.returncode != 0:
        pytest.skip("could not mount a tmpfs here")

    def fill(free_kib: int) -> Path:
        filler = folder / "filler"
        filler.write_bytes(b"\0" * (256 - free_kib) * 1024)
        return filler

    yield folder, fill
    subprocess.run(["umount", "-l", str(folder)])


def test_full_disk_preprocess_one_line_nothing_left(dataset, tiny_disk):
    disk, fill = tiny_disk
    filler = fill(100)  # a stack of the 40 images of 32 x 32 float32 needs 161 KiB
    out = _cli("preprocess", "--star", dataset / "particles.star", "--out", disk)
    line = _one_line(out, status=1)
    assert line.startswith(f"cryomatch: error: {disk}/particles/stack_000000.mrcs: "), line
    assert "No space left on device" in line
    assert _files(disk) == [filler] and not (disk / "particles").exists()


def test_full_disk_after_a_finished_stack_removes_it(dataset, tiny_disk):
    disk, fill = tiny_disk
    filler = fill(120)  # room for one stack of 20 images (81 KiB), not for two
    out = _cli(
        "preprocess", "--star", dataset / "particles.star", "--out", disk, "--stack-size", 20
    )
    assert "stack_000001.mrcs: No space left on device" in _one_line(out, status=1)
    assert _files(disk) == [filler]  # the finished first stack is removed too


def test_full_disk_fourier_stack(dataset, tmp_path, tiny_disk):
    disk, fill = tiny_disk
    filler = fill(64)
    star = str(dataset / "particles.star")
    assert main(["preprocess", "--star", star, "--out", str(tmp_path)]) == 0
    star = tmp_path / "particles" / "stack_000000.star"
    out = _cli("fourier-stack", "--star", star, "--out", disk)
    assert "No space left on device" in _one_line(out, status=1)
    assert _files(disk) == [filler]


def test_memory_mapped_writer_reports_a_full_disk(tmp_path, monkeypatch):
    """Everywhere (no root): the disk blocks of a mapped output are reserved before any
    page is written, so a full disk is an OSError naming the output, not a SIGBUS."""

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(atomic.os, "posix_fallocate", full)
    with pytest.raises(OSError) as caught:
        StackWriter(tmp_path / "s.mrcs", 10, 16, 1.0)
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(tmp_path / "s.mrcs")
    assert _files(tmp_path) == []


def test_reserved_space_is_allocated(tmp_path):
    with StackWriter(tmp_path / "s.mrcs", 20, 64, 1.0) as writer:
        tmp = atomic.temporaries(tmp_path / "s.mrcs")[0]
        assert os.stat(tmp).st_blocks * 512 >= 20 * 64 * 64 * 4  # not a sparse file
        writer.write(np.ones((20, 64, 64), np.float32))


@pytest.fixture
def as_user(tmp_path):
    """A user that permissions apply to: 'nobody' through setpriv when root, else oneself;
    and a folder that user may use."""
    if ROOT and not shutil.which("setpriv"):
        pytest.skip("root ignores permissions and setpriv is missing")
    if ROOT and _cli("--help", user="65534").returncode != 0:
        pytest.skip(f"user 'nobody' cannot run this checkout ({REPO} or the venv not readable)")
    folder = Path(tempfile.mkdtemp(prefix="cryomatch-perm-"))
    os.chmod(folder, 0o777)
    yield ("65534" if ROOT else None), folder
    shutil.rmtree(folder, ignore_errors=True)


def _world_readable_copy(dataset, folder):
    data = folder / "in"
    shutil.copytree(dataset, data)
    for p in [data, *data.iterdir()]:
        os.chmod(p, 0o755 if p.is_dir() else 0o644)
    return data


def test_unreadable_stack(dataset, as_user):
    user, folder = as_user
    data = _world_readable_copy(dataset, folder)
    os.chmod(data / "particles.mrcs", 0o000)
    out = _cli("preprocess", "--star", data / "particles.star", "--out", folder / "out", user=user)
    line = _one_line(out, status=1)
    assert "particles.mrcs: Permission denied" in line, line
    assert not (folder / "out").exists()


def test_output_folder_not_writable(dataset, as_user):
    user, folder = as_user
    data = _world_readable_copy(dataset, folder)
    (folder / "out" / "particles").mkdir(parents=True)
    os.chmod(folder / "out" / "particles", 0o555)
    out = _cli("preprocess", "--star", data / "particles.star", "--out", folder / "out", user=user)
    line = _one_line(out, status=1)
    assert "out/particles/stack_000000.mrcs: Permission denied" in line, line
    assert _files(folder / "out") == []


def test_an_os_error_anywhere_is_one_line(monkeypatch, capsys):
    def broken(args):
        raise OSError(errno.EIO, "Input/output error", "/data/x.mrcs")

    import cryomatch.stages.preprocess as stage

    monkeypatch.setattr(stage, "run", broken)
    assert main(["preprocess", "--star", "x", "--out", "y"]) == 1
    assert capsys.readouterr().err == "cryomatch: error: /data/x.mrcs: Input/output error\n"


def test_a_bug_is_one_line_last_with_its_traceback_above(monkeypatch, capsys):
    import cryomatch.stages.preprocess as stage

    monkeypatch.setattr(stage, "run", lambda args: 1 / 0)
    assert main(["preprocess", "--star", "x", "--out", "y"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("Traceback") and err[-1].startswith("cryomatch: error: internal")


# --- 3. out-of-range options: one line before any work ------------------------------------
@pytest.mark.parametrize(
    "args, what",
    [
        (["preprocess", "--batch-size", "0"], "--batch-size: 0 is out of range"),
        (["preprocess", "--stack-size", "-5"], "--stack-size: -5 is out of range"),
        (["preprocess", "--box", "x"], "--box: 'x' is not an integer"),
        (["fourier-stack", "--batch-size", "0"], "--batch-size: 0 is out of range"),
        (["simulate", "particles", "--phantom", "--snr", "0"], "--snr: 0 is out of range"),
        (["simulate", "particles", "--phantom", "--pixel-size", "nan"], "--pixel-size: nan"),
        (["subtomo", "align", "--batch-size", "0"], "--batch-size: 0 is out of range"),
        (["tomo-align", "--binning", "0"], "--binning: 0 is out of range"),
    ],
)
def test_out_of_range_options(args, what, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main([*args, "--star", "s", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and what in err, err
    assert not (tmp_path / "o").exists()


def test_simulate_more_than_memory_holds(tmp_path):
    out = _cli(
        "simulate", "particles", "--phantom", "--n", 10**9, "--snr", 1, "--box", 64, "--seed", 1,
        "--out", tmp_path / "o",
    )  # fmt: skip
    line = _one_line(out, status=2)
    assert "simulating 1000000000 particles needs about" in line and "GiB" in line
    assert not (tmp_path / "o").exists()


# --- 4. degenerate data ----------------------------------------------------------------
def _set_images(stack: Path, indices, value):
    with mrcfile.open(stack, mode="r+") as mrc:
        for i in indices:
            mrc.data[i] = value


@pytest.mark.parametrize("value", [0.0, 3.5])
def test_constant_images_are_an_error_naming_them(capsys, dataset, tmp_path, value):
    _set_images(dataset / "particles.mrcs", [2, 7], value)
    code = main(["preprocess", "--star", str(dataset / "particles.star"), "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "2 image(s) have no variance" in err
    assert "000003@" in err and "000008@" in err and "particles.mrcs" in err
    assert _files(tmp_path / "particles") == []


def test_constant_image_in_fourier_stack(capsys, dataset, tmp_path):
    star = str(dataset / "particles.star")
    assert main(["preprocess", "--star", star, "--out", str(tmp_path)]) == 0
    _set_images(tmp_path / "particles" / "stack_000000.mrcs", [5], 0.0)
    star = str(tmp_path / "particles" / "stack_000000.star")
    assert main(["fourier-stack", "--star", star, "--out", str(tmp_path / "fft")]) == 2
    err = capsys.readouterr().err
    assert "1 image(s) have no variance in the image" in err and "000006@" in err
    assert _files(tmp_path / "fft") == []


def test_all_zero_stack(capsys, dataset, tmp_path):
    _set_images(dataset / "particles.mrcs", range(40), 0.0)
    assert main(["preprocess", "--star", str(dataset / "particles.star"), "--out", str(tmp_path)])
    assert "40 image(s) have no variance" in capsys.readouterr().err


def test_all_zero_map(tmp_path):
    write_mrc(tmp_path / "zero.mrc", np.zeros((8, 8, 8), np.float32), 1.0)
    with pytest.raises(Exception, match="zero.mrc: the map is all zeros"):
        read_volume(tmp_path / "zero.mrc")


def _duplicate_rows(dataset):
    blocks = read_star(dataset / "particles.star")
    table = blocks["particles"]
    blocks["particles"] = pd.concat([table, table.iloc[[4, 9, 9]]], ignore_index=True)
    write_star(dataset / "particles.star", blocks)


def test_duplicate_rows_are_an_error_naming_them(capsys, dataset, tmp_path):
    _duplicate_rows(dataset)
    code = main(["preprocess", "--star", str(dataset / "particles.star"), "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "3 particle row(s) repeat an earlier row's image" in err
    assert "000005@particles.mrcs (row 41)" in err and "000010@particles.mrcs (row 42)" in err


def test_duplicate_rows_dropped_with_a_counted_warning(capsys, dataset, tmp_path):
    _duplicate_rows(dataset)
    star = str(dataset / "particles.star")
    assert main(["preprocess", "--star", star, "--out", str(tmp_path), "--drop-duplicates"]) == 0
    assert "dropped 3 particle row(s)" in capsys.readouterr().err
    assert len(starfile.read(tmp_path / "particles" / "particles.star")["particles"]) == 40
    assert workflow.count_particles(star, "drop") == 40
    with pytest.raises(Exception, match="repeat an earlier row"):
        workflow.count_particles(star)


# --- 5. recovery: stale temporaries and locks --------------------------------------------
def test_a_rewrite_sweeps_stale_temporaries(tmp_path):
    stale = tmp_path / ".a.star.tmp-abc123.star"
    stale.write_text("half")
    other = tmp_path / ".b.star.tmp-abc123.star"
    other.write_text("half")
    atomic.write_text(tmp_path / "a.star", "data\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".b.star.tmp-abc123.star", "a.star"]


def _locked(folder: Path, owner: str | None) -> Path:
    locks = folder / ".snakemake" / "locks"
    locks.mkdir(parents=True)
    (locks / "0.output.lock").write_text("results/x\n")
    if owner:
        (locks / workflow.OWNER).write_text(owner)
    return locks


def test_stale_lock_of_a_dead_run_is_released(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    import socket

    host = socket.gethostname()
    locks = _locked(tmp_path / "a", f"{host} {dead.pid}\n")
    assert workflow.release_stale_lock(tmp_path / "a" / ".snakemake") and not locks.exists()
    locks = _locked(tmp_path / "b", f"{host} {os.getpid()}\n")  # alive: kept
    assert workflow.release_stale_lock(tmp_path / "b" / ".snakemake") is None and locks.exists()
    locks = _locked(tmp_path / "c", f"elsewhere.example {dead.pid}\n")  # another host: kept
    assert workflow.release_stale_lock(tmp_path / "c" / ".snakemake") is None and locks.exists()
    # a job of the dead run still runs in this folder: kept, and said why
    locks = _locked(tmp_path / "d", f"{host} {dead.pid}\n")
    sleeper = "import time; print(flush=True); time.sleep(30)"
    job = subprocess.Popen(
        [sys.executable, "-c", sleeper, "-m", "cryomatch"],
        cwd=tmp_path / "d",
        stdout=subprocess.PIPE,
    )
    try:
        job.stdout.readline()  # it runs
        message = workflow.release_stale_lock(tmp_path / "d" / ".snakemake")
    finally:
        job.kill()
        job.wait()
    assert f"its jobs still run (pids {job.pid})" in message and locks.exists()


def test_failure_messages_name_the_log(tmp_path):
    logs = tmp_path / "logs"
    (logs / "slurm").mkdir(parents=True)
    (logs / "a.log").write_text("progress\ncryomatch: error: x.mrcs: truncated\n")
    (logs / "slurm" / "1.log").write_text("slurmstepd: error: *** JOB 1 CANCELLED ***\n")
    (logs / "ok.log").write_text("done\n")
    found = workflow.failure_messages(logs, since=time.time() - 60)
    assert found == [
        f"cryomatch: error: x.mrcs: truncated  [log: {logs / 'a.log'}]",
        f"slurmstepd: error: *** JOB 1 CANCELLED ***  [log: {logs / 'slurm' / '1.log'}]",
    ]
    assert workflow.failure_messages(logs, since=time.time() + 60) == []


# --- 1, 5, 6 through Snakemake -------------------------------------------------------------
def _bare_environment():
    """No venv on PATH, no PYTHONPATH: as a user who did not activate the venv."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = "/usr/bin:/bin"
    env["OPENBLAS_NUM_THREADS"] = "1"
    return env


@pytest.mark.workflow
def test_failed_job_shows_its_error_line_without_activating_the_venv(tmp_path, demo_particles):
    cmd = command(tmp_path, configfile=truncated_stack_config(tmp_path, demo_particles))
    out = subprocess.run(cmd, capture_output=True, text=True, env=_bare_environment())
    assert out.returncode != 0
    text = out.stderr + out.stdout
    error = [x for x in text.splitlines() if x.startswith("cryomatch: error:")]
    assert len(error) == 1, text
    assert "particles.mrcs: truncated MRC file" in error[0]
    assert error[0].endswith("[log: results/logs/preprocess.log]")
    assert text.index(error[0]) < text.index("Complete log(s)")
    assert "    input:" not in text and "No module named" not in text  # no file lists


def _kill_when(folder: Path, config: Path, ready, poll: float = 0.02) -> bool:
    """Start the workflow, SIGKILL its whole process group once ``ready(folder)``; False if
    the run ended before that."""
    run = subprocess.Popen(
        command(folder, configfile=config),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=_bare_environment(),
        start_new_session=True,
    )
    while run.poll() is None and not ready(folder):
        time.sleep(poll)
    ended = run.poll() is not None
    if not ended:
        os.killpg(run.pid, signal.SIGKILL)
    run.wait()
    return not ended


def _temporaries(folder: Path, part: str = ""):
    root = folder / "results"
    return [p for p in root.rglob(".*.tmp-*") if part in p.name] if root.exists() else []


def _outputs(folder: Path) -> dict[str, bytes]:
    root = folder / "results"
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and p.relative_to(root).parts[0] not in ("logs", "benchmarks")
    }


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("uninterrupted")
    snakemake(folder, configfile=write_config(folder, TINY))
    return _outputs(folder)


def _star_being_written(folder: Path) -> bool:
    """The demo STAR's temporary exists (looked up in its own folder only: it lives for
    milliseconds, too short for a walk of the whole tree)."""
    try:
        names = os.listdir(folder / "results/demo/particles")
    except FileNotFoundError:
        return False
    return any(n.startswith(".particles.star.tmp-") for n in names)


KILL_POINTS = {
    "stack": lambda f: bool(_temporaries(f, "stack_")),
    "demo-star": _star_being_written,
    "after-simulate": lambda f: (f / "results/benchmarks/simulate_particles.tsv").exists(),
}


def _kill_and_rerun(tmp_path, uninterrupted, point):
    # a short-lived kill point can be missed by the polling: try again in a fresh folder
    for attempt in range(6):
        folder = tmp_path / f"try{attempt}"
        folder.mkdir()
        config = write_config(folder, TINY)
        if _kill_when(folder, config, KILL_POINTS[point], poll=0.001 if attempt else 0.02):
            break
    else:
        raise AssertionError(f"kill point {point!r} missed in 6 runs: each ended before it")
    tmp_path = folder
    out = subprocess.run(
        command(tmp_path, configfile=config), capture_output=True, text=True,
        env=_bare_environment(),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert _temporaries(tmp_path) == []
    assert _outputs(tmp_path) == uninterrupted


@pytest.mark.workflow
@pytest.mark.slow  # about 35 s each on 2 busy cores, and 20 s for the uninterrupted run
@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_kill_9_anywhere_then_the_same_command_completes(tmp_path, uninterrupted, point):
    _kill_and_rerun(tmp_path, uninterrupted, point)


# --- 6. the report; 7. plain readers ------------------------------------------------------
def test_report_dependency_is_installed_by_the_plain_install():
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert any(d.startswith("pygments") for d in project["dependencies"])


def test_outputs_open_with_plain_readers(dataset, tmp_path):
    star = str(dataset / "particles.star")
    assert main(["preprocess", "--star", star, "--out", str(tmp_path)]) == 0
    assert len(starfile.read(tmp_path / "particles" / "particles.star")["particles"]) == 40
    with mrcfile.open(tmp_path / "particles" / "stack_000000.mrcs") as mrc:  # not permissive
        assert mrc.data.shape == (40, 32, 32)
    assert main(["simulate", "tiltseries", "--out", str(tmp_path / "ts"), "--size", "32"]) == 0
    truth = pd.read_csv(tmp_path / "ts" / "truth.csv")
    assert len(truth) > 3 and not any(str(c).startswith("#") for c in truth.columns)
    prov = json.loads((tmp_path / "ts" / "truth.csv.provenance.json").read_text())
    assert prov["stage"] == "simulate tiltseries"
