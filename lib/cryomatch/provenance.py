"""What every output records: cryomatch version, the command, the stage and its parameters."""

from __future__ import annotations

import json
import shlex

from . import __version__

_command: list[str] | None = None  # set by the command line; None for Python API calls


def set_command(argv: list[str]) -> None:
    """Record the command line that is running (called by ``cryomatch.cli.main``)."""
    global _command
    _command = list(argv)


def record(stage: str, params: dict | None = None) -> dict:
    """Provenance of an output: version, stage, command line and parameters (no timestamps,
    so the same inputs and config give byte-identical outputs)."""
    command = " ".join(shlex.quote(a) for a in _command) if _command else f"python API ({stage})"
    return {
        "cryomatch_version": __version__,
        "stage": stage,
        "command": command,
        "params": _jsonable(params or {}),
    }


def comment_lines(prov: dict) -> list[str]:
    """Provenance as '# key: value' lines for STAR and CSV headers."""
    return [
        f"# cryomatch {prov['cryomatch_version']} stage: {prov['stage']}",
        f"# command: {prov['command']}",
        f"# params: {json.dumps(prov['params'], sort_keys=True)}",
    ]


def mrc_labels(prov: dict) -> list[str]:
    """Up to 10 MRC header labels of 80 characters: version and stage, then the command."""
    labels = [f"cryomatch {prov['cryomatch_version']} {prov['stage']}"]
    command = prov["command"]
    while command and len(labels) < 10:
        labels.append(command[:80])
        command = command[80:]
    return labels


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return value.item()
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)
