"""Helpers the Snakefile uses: package sources per stage (so that code edits rerun the
rules that use them), command-line options from config sections, particle counts, the
errors of failed jobs, and locks left by a killed run."""

from __future__ import annotations

import ast
import math
import os
import re
import shlex
import shutil
import socket
import sys
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parent
# Command tables, not computation: editing them (adding a stage) reruns nothing.
_REGISTRIES = {
    PACKAGE_ROOT / "stages" / "__init__.py",
    PACKAGE_ROOT / "stages" / "simulate" / "__init__.py",
}


def package_sources(module: str) -> list[str]:
    """Files of ``module`` (e.g. 'cryomatch.stages.preprocess') and of every cryomatch module
    it imports, transitively, plus the package's ``__init__`` files on the way."""
    seen: set[Path] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        path = _module_file(name)
        if path is None or path in seen:
            continue
        seen.add(path)
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # parent packages
        package = name if path.name == "__init__.py" else ".".join(parts[:-1])
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                todo += [a.name for a in node.names if a.name.startswith("cryomatch")]
            elif isinstance(node, ast.ImportFrom):
                base = _absolute(node, package)
                if base and base.startswith("cryomatch"):
                    todo.append(base)
                    todo += [f"{base}.{a.name}" for a in node.names]  # submodules
    return sorted(str(p) for p in seen - _REGISTRIES)


def _module_file(name: str) -> Path | None:
    """The source file of a cryomatch module name, without importing it (None if not one)."""
    parts = name.split(".")
    if parts[0] != "cryomatch":
        return None
    base = PACKAGE_ROOT.joinpath(*parts[1:])
    for candidate in (base / "__init__.py", base.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def _absolute(node: ast.ImportFrom, package: str) -> str | None:
    if node.level == 0:
        return node.module
    parts = package.split(".")
    base = parts[: len(parts) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def cli_options(section: dict, flags: dict[str, str]) -> str:
    """Command-line options for the config keys in ``flags`` ({key: '--flag'}).

    None is left out; True gives the bare flag, False nothing; a flag written '--no-x'
    is given when the value is False; lists give several values.
    """
    out = []
    for key, flag in flags.items():
        value = section.get(key)
        if value is None:
            continue
        if flag.startswith("--no-"):
            if value is False:
                out.append(flag)
        elif value is True:
            out.append(flag)
        elif value is False:
            continue
        elif isinstance(value, (list, tuple)):
            out += [flag, *(shlex.quote(str(v)) for v in value)]
        else:
            out += [flag, shlex.quote(str(value))]
    return " ".join(out)


def count_particles(path: str, duplicates: str = "error") -> int:
    """Number of particle rows in a STAR or .cs file (read without opening images); rows
    that repeat an image are an error, or not counted with ``duplicates='drop'``."""
    from .io.particles import read_particles

    return len(read_particles(path, require_ctf=False, images=False, duplicates=duplicates))


def count_subvolumes(path) -> int:
    """Rows of a particle STAR, or volumes in a volume stack (its header only)."""
    if str(path).endswith(".star"):
        from .io.star import read_star

        blocks = read_star(path)
        table = blocks.get("particles")
        return len(table if table is not None else list(blocks.values())[-1])
    from .io.volumes import VolumeStackReader

    with VolumeStackReader(path) as reader:
        return len(reader)


def n_stacks(n_particles: int, stack_size: int) -> int:
    return max(1, math.ceil(n_particles / stack_size))


# --- runs that stop: failed jobs' messages, locks left by a killed Snakemake ----------------
OWNER = "cryomatch.owner"  # in .snakemake/locks/: host and pid of the run holding the lock
_STAGE_ERROR = re.compile(r"^cryomatch: error: .*$", re.MULTILINE)
_SLURM_ERROR = re.compile(r"^slurmstepd: error: .*$", re.MULTILINE)


def failure_messages(log_dir: str | os.PathLike, since: float) -> list[str]:
    """The one-line errors in job logs under ``log_dir`` written since ``since`` (epoch s),
    each followed by its log's path: ``cryomatch: error: ...`` lines of the stages' logs,
    ``slurmstepd: error: ...`` lines (time limit, memory) of SLURM's logs (``slurm/``)."""
    found = []
    for log in sorted(Path(log_dir).rglob("*.log")):
        slurm = "slurm" in log.relative_to(log_dir).parts[:-1]
        try:
            if log.stat().st_mtime < since:
                continue
            text = log.read_text(errors="replace")
        except OSError:
            continue
        lines = (_SLURM_ERROR if slurm else _STAGE_ERROR).findall(text)
        found += [f"{line}  [log: {log}]" for line in lines]
    return found


def print_failures(log_dir: str | os.PathLike, since: float) -> None:
    """Print the :func:`failure_messages` of a failed run to stderr."""
    messages = failure_messages(log_dir, since) or [
        "(no error line in the job logs: see Snakemake's messages above)"
    ]
    print("\n".join(["", "Failed jobs:", *messages, ""]), file=sys.stderr)


def record_lock_owner(snakemake_dir: str | os.PathLike = ".snakemake") -> None:
    """Note this host and process beside Snakemake's lock (called once the lock is held;
    Snakemake removes the folder, and the note, when it unlocks)."""
    locks = Path(snakemake_dir) / "locks"
    if locks.is_dir():
        (locks / OWNER).write_text(f"{socket.gethostname()} {os.getpid()}\n")


def release_stale_lock(snakemake_dir: str | os.PathLike = ".snakemake") -> str | None:
    """Remove Snakemake's lock when the run that took it is dead (killed with -9, or the
    machine went down): its owner note names this host and a process that no longer
    exists, or there is no note and no Snakemake process on this host works in this
    folder. A lock taken on another host is kept, and so is the lock of a dead run whose
    jobs still run here (they would overwrite a new run's outputs). Returns a message
    when one was removed or kept for running jobs."""
    locks = Path(snakemake_dir) / "locks"
    if not any(locks.glob("*.lock")):
        return None
    folder = Path(snakemake_dir).resolve().parent
    owner = locks / OWNER
    try:
        host, pid = owner.read_text().split()
    except (OSError, ValueError):
        host, pid = None, None
    if host is not None:
        if host != socket.gethostname() or _alive(int(pid)):
            return None
    elif _processes_in(folder, "snakemake"):
        return None
    jobs = _processes_in(folder, "cryomatch")
    if jobs:
        return (
            f"the Snakemake run that locked this folder is dead but its jobs still run "
            f"(pids {' '.join(map(str, jobs))}): wait for them to end, or end them, and "
            "run again"
        )
    shutil.rmtree(locks, ignore_errors=True)
    who = f"{host} pid {pid}" if host else "no owner noted"
    return f"removed the lock of a Snakemake run that no longer exists ({who})"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _processes_in(folder: Path, word: str) -> list[int]:
    """Other processes on this host whose command line holds ``word`` and whose working
    folder is ``folder``."""
    mine = {os.getpid(), os.getppid()}
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if int(proc.name) in mine:
                continue
            if word not in (proc / "cmdline").read_bytes().decode(errors="replace"):
                continue
            if Path(os.readlink(proc / "cwd")) == folder:
                found.append(int(proc.name))
        except (OSError, ValueError):
            continue
    return sorted(found)
