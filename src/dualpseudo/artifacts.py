"""The files stages exchange: atomic writes, safe loading, hashes (`manifest.py` says when a stage is done).

Every file is written to a temporary name in the same folder and renamed into place, so a reader sees either
the old file, the complete new file, or nothing. Tensors are loaded with `weights_only=True`, never unpickled as
code.

A resumable training state (`save_state`) has its sha256 recorded beside it (`state.pt.sha256`, written before
the state is renamed into place, so it also lists the state it replaces); `load_state` refuses a state whose
bytes match neither. A text file whose new content equals the old one is not rewritten, so a finished run can be
read, reported and evaluated from a read-only directory.
"""
from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import shutil
import signal
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

_UMASK = os.umask(0)
os.umask(_UMASK)


class ArtifactError(RuntimeError):
    """An artifact that is missing, truncated, of the wrong schema or otherwise unusable; `path` is the file
    (None when the raiser did not say; see `concerning`)."""

    def __init__(self, message: str, path: str | Path | None = None):
        super().__init__(message)
        self.path = None if path is None else Path(path)


@contextmanager
def concerning(path: str | Path):
    """Within this block, an ArtifactError that names no `path` is about `path` (for callees that name their
    file only in the message, e.g. a training loop refusing its own `state.pt`)."""
    try:
        yield
    except ArtifactError as e:
        if e.path is None:
            e.path = Path(path)
        raise


def atomic_write(path: str | Path, write: Callable[[io.BufferedWriter], None],
                 before_replace: Callable[[Path], None] | None = None) -> Path:
    """Call `write(fileobj)` on a temp file beside `path`, fsync, then rename it onto `path`.

    `before_replace(temp_path)` runs on the complete temp file just before the rename. A failed torch.save
    (torch's `inline_container.cc` text) is re-raised as the OSError it stands for (ENOSPC when the disk is full).
    Ctrl-C or SIGTERM during the write takes effect once the file is in place (see `interrupts_held`).
    """
    with interrupts_held():
        return _atomic_write(Path(path), write, before_replace)


@contextmanager
def interrupts_held():
    """Hold SIGINT and SIGTERM for the duration of the block, then deliver the first one that arrived.

    An exception raised by a signal handler inside torch.save's C++ writer does not propagate as itself: the writer
    sees a short write and fails with "unexpected pos", which would read as a disk error instead of an
    interruption. Files are small enough that waiting for the write to finish costs a user nothing. Outside the
    main thread (where handlers cannot be set) the block runs unchanged.
    """
    held = (signal.SIGINT, signal.SIGTERM)
    if threading.current_thread() is not threading.main_thread() or None in map(signal.getsignal, held):
        yield                                   # not the main thread, or a handler not set from Python
        return
    arrived: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: arrived.append(signum)) for s in held}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if arrived:
            signal.raise_signal(arrived[0])     # the restored handler runs now: raises, or ends the process


def _atomic_write(path: Path, write: Callable[[io.BufferedWriter], None],
                  before_replace: Callable[[Path], None] | None) -> Path:
    """`atomic_write`'s body, with interrupts held by the caller."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:                                # e.g. a read-only directory: name the file, not the dir
        raise OSError(e.errno, e.strerror, str(path)) from None
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)                  # mkstemp makes 0600; artifacts are ordinary files
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if before_replace is not None:
            before_replace(Path(tmp))
        os.replace(tmp, path)
    except RuntimeError as e:                           # torch.save reports a failed write without its errno
        Path(tmp).unlink(missing_ok=True)
        if "inline_container" not in str(e) and "PytorchStreamWriter" not in str(e):
            raise
        raise _write_failure(path, e) from None
    except OSError as e:                                # name the file (fsync and write do not)
        Path(tmp).unlink(missing_ok=True)
        if e.filename is not None or e.errno is None:
            raise
        raise OSError(e.errno, e.strerror, str(path)) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _write_failure(path: Path, e: Exception) -> OSError:
    """The OSError a failed torch.save stands for: ENOSPC when the device is (nearly) full, else EIO."""
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        free = None
    if free is not None and free < 64 << 20:
        return OSError(errno.ENOSPC, f"No space left on device ({free >> 20} MiB free)", str(path))
    first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
    return OSError(errno.EIO, f"write failed ({first})", str(path))


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` atomically; a file that already holds exactly these bytes is left as it is."""
    path = Path(path)
    if _holds(path, data):
        return path
    return atomic_write(path, lambda f: f.write(data))


def _holds(path: Path, data: bytes) -> bool:
    try:
        return path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data
    except OSError:
        return False


def write_text(path: str | Path, text: str) -> Path:
    return write_bytes(path, text.encode())


def write_json(path: str | Path, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


def read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{path} does not exist", path) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path} is not valid JSON ({e}); delete it to rebuild", path) from None


def read_log(path: str | Path, upto: int | float, key: str = "step", rewrite: bool = True) -> list[str]:
    """The lines of a JSON-lines log (`stats.jsonl`) whose `key` is <= `upto`, for a resumed training to extend.

    The log is derived from the training, so lines that are not JSON objects with a numeric `key`, and an
    unreadable file, are dropped with a warning instead of stopping the run; with `rewrite` (rank 0) the file is
    rebuilt from the lines kept at once."""
    import sys

    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError) as e:
        print(f"warning: {path} is unreadable ({e}); it is rebuilt from the training state", file=sys.stderr)
        if rewrite:
            write_text(path, "")
        return []
    kept, bad = [], 0
    for line in lines:
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            value = row[key] if isinstance(row, dict) else None
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        except (ValueError, KeyError):
            ok = False
        if not ok:
            bad += 1
        elif value <= upto:
            kept.append(line)
    if bad:
        print(f"warning: {path}: dropped {bad} unreadable line(s); the log is rebuilt without them", file=sys.stderr)
        if rewrite:
            write_text(path, "".join(line + "\n" for line in kept))
    return kept


def save_npz(path: str | Path, **arrays: np.ndarray) -> Path:
    """Write arrays to an uncompressed .npz atomically."""
    return atomic_write(path, lambda f: np.savez(f, **arrays))


def load_npz(path: str | Path, keys: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """Read every array of an .npz (no pickles); `keys` must all be present."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            out = {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise ArtifactError(f"{path} does not exist", path) from None
    except Exception as e:  # zipfile/pickle/value errors all mean: unusable file
        raise ArtifactError(f"{path} is unreadable ({type(e).__name__}: {e}); delete it to rebuild", path) from None
    missing = [k for k in keys if k not in out]
    if missing:
        raise ArtifactError(f"{path} lacks arrays {missing}", path)
    return out


def load_cached(path: str | Path, key: str, arrays: tuple[str, ...], key_array: str = "key"
                ) -> dict[str, np.ndarray] | None:
    """The arrays of a keyed cache file (an .npz holding its key as the string array `key_array`) when it is
    readable, has `arrays` and was written under `key`; else None: a miss, to compute and overwrite."""
    if not Path(path).is_file():
        return None
    try:
        z = load_npz(path, (*arrays, key_array))
    except ArtifactError:
        return None
    return z if str(z[key_array]) == key else None


def save_torch(path: str | Path, obj: Any) -> Path:
    """Save tensors and plain Python data (dicts, lists, numbers, strings) atomically."""
    return atomic_write(path, lambda f: torch.save(obj, f))


def load_torch(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """Load a file written by `save_torch`; refuses anything that would execute code when unpickled."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path} does not exist", path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ArtifactError(f"{path} cannot be loaded safely ({first[:200]}); delete it to rebuild", path) from None


def _state_record(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


_KNOWN_STATE: dict[str, str] = {}          # path -> sha256 of the state this process last wrote or verified there


def save_state(path: str | Path, obj: Any) -> Path:
    """`save_torch` for a resumable training state, with its sha256 recorded in `<name>.sha256`.

    The record is written before the state is renamed into place and keeps the hash of the state it replaces,
    so a kill between the two writes leaves a state that still verifies."""
    path = Path(path)

    def record(tmp: Path) -> None:
        new = _sha256(tmp)
        old = _KNOWN_STATE.get(str(path))
        if old is None and path.is_file():
            old = _sha256(path)
        write_text(_state_record(path), "".join(f"{h}  {path.name}\n" for h in dict.fromkeys([new, old]) if h))
        _KNOWN_STATE[str(path)] = new

    return atomic_write(path, lambda f: torch.save(obj, f), before_replace=record)


def load_state(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """`load_torch` for a file written by `save_state`, after checking its bytes against the recorded sha256.

    A state without a record (written before states had one) is loaded unchecked."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path} does not exist", path)
    rec = _state_record(path)
    if rec.is_file():
        try:
            known = [line.split()[0] for line in rec.read_text().splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError, IndexError):
            known = []
        digest = _sha256(path)
        if digest not in known:
            raise ArtifactError(f"{path} does not match the sha256 recorded in {rec.name} (the file was altered "
                                f"or damaged); delete it to start this training over", path)
        _KNOWN_STATE[str(path)] = digest
    return load_torch(path, map_location)


def discard_state(path: str | Path) -> None:
    """Delete a resumable training state and its sha256 record (a stale state: see `manifest.reset_if_stale`)."""
    path = Path(path)
    path.unlink(missing_ok=True)
    _state_record(path).unlink(missing_ok=True)
    _KNOWN_STATE.pop(str(path), None)


def save_weights(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict, key: str) -> Path:
    """Tensors as safetensors with `meta` as JSON in the header under `key`, written atomically."""
    import safetensors.torch

    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    return write_bytes(path, safetensors.torch.save(tensors, metadata={key: json.dumps(meta)}))


def weights_meta(path: str | Path) -> dict[str, dict]:
    """The `meta` dicts in a `save_weights` file's header, by key, read without loading any tensor (ArtifactError
    when the file is missing or not safetensors; a key whose value is not a JSON object is left out)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n)) if 0 < n < 1 << 26 else None
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{path} is not a readable safetensors file ({e})", path) from None
    if not isinstance(header, dict):
        raise ArtifactError(f"{path} is not a safetensors file (no header)", path)
    out = {}
    for key, text in (header.get("__metadata__") or {}).items():
        try:
            meta = json.loads(text)
        except (TypeError, ValueError):
            continue
        if isinstance(meta, dict):
            out[key] = meta
    return out


def load_weights(path: str | Path, key: str, what: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, meta) from a file written by `save_weights`; no pickle involved. `what` names it in errors."""
    import safetensors

    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path} does not exist", path)
    try:
        with safetensors.safe_open(str(path), framework="pt", device="cpu") as f:
            meta = json.loads((f.metadata() or {})[key])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise ArtifactError(f"{path} is not a {what} ({type(e).__name__}: {e}); delete it to rebuild", path) from None
    return tensors, meta


def file_hash(path: str | Path) -> str:
    """sha256 (first 16 hex digits) of a file's bytes."""
    return _sha256(Path(path))[:16]


def array_hash(*arrays: np.ndarray) -> str:
    """sha256 (first 16 hex digits) of arrays' shapes, dtypes and bytes."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]
