"""Manifests: when a stage is done, and what a run directory's hashes mean.

A stage's manifest (`manifest.json`) is written last, after every output; it records the schema version, the
hash of the config that produced the stage, the hashes of its inputs and of its outputs. A stage is done only
when its manifest exists, its hashes match what the caller expects and every output still has the recorded
hash. A stage's resumable training state is kept only while the key it was made under (`state_key.json`) holds.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from .artifacts import ArtifactError, discard_state, file_hash, read_json, write_json

SCHEMA_VERSION = 2          # of run directories: what a manifest's hashes mean (a change is listed below)
SCHEMA_CHANGES = {2: "stage hashes leave out checkpoint and log intervals and inference batch sizes"}
MANIFEST = "manifest.json"
STATE_KEY = "state_key.json"          # the key a stage's resumable training state was made under


def write_manifest(stage_dir: str | Path, config_hash: str, inputs: dict[str, str],
                   outputs: list[str], extra: dict | None = None) -> dict:
    """Record a finished stage: config hash, input hashes, and the hash of each output file (written last)."""
    from . import __version__

    stage_dir = Path(stage_dir)
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "package_version": __version__,
        "config_hash": config_hash,
        "inputs": dict(inputs),
        "outputs": {name: file_hash(stage_dir / name) for name in outputs},
        **(extra or {}),
    }
    write_json(stage_dir / MANIFEST, manifest)
    return manifest


def read_manifest(stage_dir: str | Path) -> dict | None:
    """The stage's manifest, or None when it has none or an unreadable one."""
    path = Path(stage_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        m = read_json(path)
    except ArtifactError:
        return None
    return m if isinstance(m, dict) else None


def manifest_schemas(root: str | Path) -> set[int]:
    """The schema versions other than SCHEMA_VERSION of the readable manifests under `root` (a manifest without
    an integer version is left to `stage_status`)."""
    out = set()
    for path in Path(root).rglob(MANIFEST) if Path(root).is_dir() else ():
        m = read_manifest(path.parent)
        version = m.get("schema_version") if m else None
        if isinstance(version, int) and not isinstance(version, bool) and version != SCHEMA_VERSION:
            out.add(version)
    return out


def stage_status(stage_dir: str | Path, config_hash: str, inputs: dict[str, str]) -> tuple[bool, str]:
    """(done, reason): done when the manifest matches the schema, config, inputs and every output's bytes."""
    stage_dir = Path(stage_dir)
    m = read_manifest(stage_dir)
    if m is None:
        return False, f"{MANIFEST} is unreadable" if (stage_dir / MANIFEST).exists() else "not run yet"
    if m.get("schema_version") != SCHEMA_VERSION:
        return False, f"schema version {m.get('schema_version')} != {SCHEMA_VERSION}"
    if m.get("config_hash") != config_hash:
        return False, "its config changed"
    if m.get("inputs") != inputs:
        return False, "its inputs changed"
    outputs = m.get("outputs")
    if not isinstance(outputs, dict) or not outputs or not all(
            isinstance(k, str) and k and isinstance(v, str) for k, v in outputs.items()):
        return False, f"{MANIFEST} is malformed"
    for name, digest in outputs.items():
        p = stage_dir / name
        try:
            if not p.is_file():
                return False, f"{name} is missing"
            if file_hash(p) != digest:
                return False, f"{name} changed since it was written"
        except (OSError, ValueError):               # a name that is no file of the stage (e.g. a NUL byte)
            return False, f"{MANIFEST} is malformed"
    return True, "done"


def invalidate(stage_dir: str | Path) -> None:
    """Forget that a stage finished (its training state, if any, is kept for resuming)."""
    (Path(stage_dir) / MANIFEST).unlink(missing_ok=True)


def adopt_key(stage_dir: str | Path, old: dict, new: dict, key_file: str = STATE_KEY) -> bool:
    """Keep files made under `old` (the same settings as an earlier run-directory schema hashed them) by writing
    `new` in their place in `key_file`; True if the key was rewritten (`reset_if_stale` then keeps the files)."""
    path = Path(stage_dir) / key_file
    try:
        current = read_json(path) if path.is_file() else None
    except ArtifactError:
        return False
    if current != old or old == new:
        return False
    write_json(path, new)
    return True


def reset_if_stale(stage_dir: str | Path, key: dict, files: tuple[str, ...], key_file: str = STATE_KEY) -> bool:
    """Delete the resumable `files` of `stage_dir` when they were made under another `key`; True if deleted.

    `key` is every setting and input hash that the files depend on; it is kept in `key_file`.
    """
    stage_dir = Path(stage_dir)
    path = stage_dir / key_file
    old = None
    if path.is_file():
        try:
            old = read_json(path)
        except ArtifactError:
            old = None
    if old == key:
        return False
    stale = [stage_dir / f for f in files if (stage_dir / f).exists()]
    for p in stale:
        if p.is_dir():
            shutil.rmtree(p)
        else:
            discard_state(p)
    invalidate(stage_dir)
    write_json(path, key)
    return bool(stale)
