"""The run folder: its record (``run.json``), its manifest, fingerprint and settings checks, and where each
stage's files go."""

from __future__ import annotations

import dataclasses
import errno
import json
import time
from pathlib import Path
from typing import Callable

from ..config import GATE_KEYS, RunConfig
from ..distributed import Ranks
from ..errors import ConceptInfluenceError
from ..fileio import atomic_write_text, file_sha256
from ..options import settings_diff
from ..provenance import invocation, package_versions

__all__ = ["RunError", "Run", "Layout", "RUN_FORMAT", "RUN_FORMAT_VERSION", "write_or_explain"]

RUN_FORMAT = "concept-influence-run"
#: 2: each fitting or scoring stage saves its settings as ``factors/settings.json`` / ``scores/settings.json``.
RUN_FORMAT_VERSION = 2


class RunError(ConceptInfluenceError, RuntimeError):
    """A run folder cannot be used or a stage cannot go on; what is already on disk stays valid."""


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def read_json(path: Path) -> dict:
    """The JSON object in ``path``; invalid JSON is a :class:`RunError` naming the file."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunError(f"{path}: invalid JSON ({e})") from None


def _write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=1) + "\n")


def write_or_explain(path: Path, write: Callable[[], object], kept: str) -> None:
    """Run ``write``; a failed write (disk full, …) becomes a :class:`RunError` saying what is kept."""
    try:
        write()
    except OSError as e:
        reason = "the disk is full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
        raise RunError(f"cannot write {path}: {reason}. {kept} Free space (or fix the cause) and run the same "
                       "command again to resume.") from e


class Layout:
    """Where the fitting and scoring stages write, under ``root``: a run folder, or one checkpoint's folder in it."""

    root: Path

    @property
    def factors_dir(self) -> Path:
        """``factors/``: the curvature, its settings, the statistics of each pass and per-rank checkpoints."""
        return self.root / "factors"

    @property
    def scores_dir(self) -> Path:
        """``scores/``: the merged scores, their settings and ``shards/``."""
        return self.root / "scores"

    @property
    def scores_path(self) -> Path:
        """``scores/scores.safetensors``: every shard merged in data order."""
        return self.scores_dir / "scores.safetensors"

    def shard_path(self, index: int) -> Path:
        """The score shard ``index``."""
        return self.scores_dir / "shards" / f"shard-{index:06d}.safetensors"


class Run(Layout):
    """A run folder: its config, its record (``run.json``) and where each stage's files go."""

    def __init__(self, path: Path, config: RunConfig):
        self.path = self.root = path
        self.config = config

    # ---- opening -------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path, config: RunConfig | None = None, create: bool = True) -> "Run":
        """Open the run folder ``path``. A new folder is set up from ``config``; an existing one is checked
        (format version) and must hold the same config if one is given."""
        path = Path(path).resolve()
        if (path / "run.json").is_file():
            return cls(path, _existing_config(path, config))
        if config is None or not create:
            raise RunError(f"{path}: not a run folder (no run.json); start one with `concept-influence run CONFIG` "
                           "or pass --config CONFIG")
        if path.exists() and any(path.iterdir()):
            raise RunError(f"{path} exists and is not a run folder; choose an empty or new folder")
        config = dataclasses.replace(config, out=str(path))  # (its sections are checked already)
        _write_json(path / "config.json", config.to_dict())
        _write_json(path / "run.json", {"format": RUN_FORMAT, "format_version": RUN_FORMAT_VERSION, "created": _now(),
                                        "versions": package_versions(), "fingerprints": {}, "stages": {}, "log": []})
        return cls(path, config)

    # ---- record --------------------------------------------------------------------------------
    @property
    def record(self) -> dict:
        """The contents of ``run.json``."""
        return read_json(self.path / "run.json")

    def update_record(self, change: Callable[[dict], None]) -> None:
        """Apply ``change`` to the record and write it back."""
        info = self.record
        change(info)
        _write_json(self.path / "run.json", info)

    def finish_stage(self, stage: str, ranks: Ranks, **details) -> None:
        """Note a finished stage in ``run.json`` (with the versions and command) and refresh the manifest."""
        entry = {"finished": _now(), "world_size": ranks.world_size, "command": invocation(),
                 "versions": package_versions(), **details}

        def change(info: dict) -> None:
            info["stages"][stage] = entry
            info["log"].append({"stage": stage, "finished": entry["finished"], "command": entry["command"]})

        self.update_record(change)
        self.write_manifest()

    def write_manifest(self) -> None:
        """List every finished file with its size and SHA-256; a file whose size and modification time are those
        of the previous manifest keeps its hash (shards and factors are not read again at every stage)."""
        path = self.path / "manifest.json"
        previous = read_json(path)["files"] if path.is_file() else {}
        files = {}
        for p in sorted(self.path.rglob("*")):
            rel = p.relative_to(self.path).as_posix()
            if p.is_file() and not p.name.startswith(".") and "partial/" not in rel and rel != "manifest.json":
                stat = p.stat()
                entry = {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}
                known = previous.get(rel, {})
                same = all(known.get(k) == v for k, v in entry.items())
                files[rel] = {**entry, "sha256": known["sha256"] if same else file_sha256(p)}
        _write_json(path, {"format_version": RUN_FORMAT_VERSION, "written": _now(), "files": files})

    def check_fingerprint(self, what: str, value: str) -> None:
        """Record a fingerprint on first use; refuse a later stage on a different model."""
        known = self.record["fingerprints"].get(what)
        if known is None:
            self.update_record(lambda info: info["fingerprints"].__setitem__(what, value))
        elif known != value:
            raise RunError(f"{self.path}: the {what} changed since this run started (fingerprint {known}, now {value}); "
                           "use a new run folder")

    def check_settings(self, stage: str, settings: dict, folder: Path | None = None) -> None:
        """Refuse ``settings`` for ``stage`` when they differ from those saved in ``<stage>/settings.json`` (or
        ``folder/settings.json``) when the stage started (see :meth:`save_settings`), naming each changed setting."""
        path = (folder or self.path / stage) / "settings.json"
        if path.is_file():
            changed = settings_diff(read_json(path), settings)
            if changed:
                raise RunError(f"{path}: the {stage} settings changed since the stage started "
                               f"({'; '.join(changed)}); use a new run folder for new settings, or put them back")

    def save_settings(self, stage: str, settings: dict, folder: Path | None = None) -> None:
        """Save the settings ``stage`` computes with as ``<stage>/settings.json`` (or ``folder/settings.json``),
        before its first output."""
        path = (folder or self.path / stage) / "settings.json"
        if not path.is_file():
            _write_json(path, settings)

    # ---- layout --------------------------------------------------------------------------------
    @property
    def direction_path(self) -> Path:
        """``probe/direction.safetensors``."""
        return self.path / "probe" / "direction.safetensors"

    @property
    def concept_spec(self):
        """The run's concept (a :class:`~concept_influence.concept_spec.ConceptSpec`): ``[concept]``, with the probe's
        direction (made by the probe stage) and evaluation texts when the run has a ``[probe]``."""
        if self.config.probe is None:
            return self.config.concept
        return self.config.concept.replace(directions=[str(self.direction_path)], eval=self.config.concept_eval)

    def is_done(self, stage: str) -> bool:
        """Whether ``run.json`` notes ``stage`` as finished."""
        return stage in self.record["stages"]


def _existing_config(path: Path, config: RunConfig | None) -> RunConfig:
    """The config stored in the run folder ``path``, after checking its format version and that ``config`` (if
    given) is the same."""
    record, config_path = path / "run.json", path / "config.json"
    info = read_json(record)
    if info.get("format") != RUN_FORMAT or info.get("format_version") != RUN_FORMAT_VERSION:
        made_by = info.get("versions", {}).get("concept-influence", "an unknown version")
        raise RunError(f"{record}: run folder format {info.get('format')!r} version {info.get('format_version')!r} "
                       f"(written by concept-influence {made_by}); this version reads {RUN_FORMAT!r} version "
                       f"{RUN_FORMAT_VERSION}. Use a new run folder, or the version that wrote it")
    stored = RunConfig.from_dict(read_json(config_path), str(config_path))
    if config is None:
        return stored
    given = {**config.to_dict(), "out": stored.out}
    changed = settings_diff(stored.to_dict(), given)
    gates = [c for c in changed if c.partition(":")[0] in GATE_KEYS]
    if len(gates) < len(changed):
        raise RunError(f"{path} was made with a different config ({'; '.join(c for c in changed if c not in gates)}); "
                       "use a new run folder for a new config")
    if gates:  # they allow or stop a stage and change no number: the folder takes them
        _write_json(config_path, given)
        info = read_json(record)
        info["log"].append({"changed": gates, "when": _now(), "command": invocation()})
        _write_json(record, info)
    return RunConfig.from_dict(given, str(config_path))
