import os
import pickle
import signal

import numpy as np
import pytest
import torch

from dualpseudo import artifacts as A
from dualpseudo import manifest as M

from conftest import Evil


def test_npz_and_json_round_trip(tmp_path):
    A.save_npz(tmp_path / "a.npz", x=np.arange(5), y=np.ones((2, 3), np.uint8))
    z = A.load_npz(tmp_path / "a.npz", ("x", "y"))
    assert z["x"].tolist() == [0, 1, 2, 3, 4] and z["y"].shape == (2, 3)
    with pytest.raises(A.ArtifactError, match="lacks"):
        A.load_npz(tmp_path / "a.npz", ("z",))
    A.write_json(tmp_path / "m.json", {"a": np.float32(1.5), "b": np.arange(2)})
    assert A.read_json(tmp_path / "m.json") == {"a": 1.5, "b": [0, 1]}


def test_interrupted_write_leaves_old_file_and_no_temp(tmp_path):
    path = tmp_path / "x.json"
    A.write_json(path, {"v": 1})

    def boom(f):
        f.write(b'{"v": 2')
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        A.atomic_write(path, boom)
    assert A.read_json(path) == {"v": 1}
    assert os.listdir(tmp_path) == ["x.json"]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_during_torch_save_lands_after_the_file(tmp_path, signum):
    """A signal that arrives while torch.save is writing takes effect once the file is complete and in place.
    Raised inside torch's C++ writer it would be swallowed into a short write ("unexpected pos"), which reads as a
    disk error, not as an interruption."""
    path = tmp_path / "state.pt"

    class Signalling:                       # a file that receives the signal on its first write
        def __init__(self, f):
            self.f, self.sent = f, False

        def write(self, b):
            if not self.sent:
                self.sent = True
                os.kill(os.getpid(), signum)
            return self.f.write(b)

        def flush(self):
            self.f.flush()

    def interrupt(signum_, frame):
        raise KeyboardInterrupt(signum_)

    # the signal's own raising handler: a test runner started in the background inherits SIGINT ignored
    previous = signal.signal(signum, interrupt)
    try:
        with pytest.raises(KeyboardInterrupt):
            A.atomic_write(path, lambda f: torch.save({"w": torch.arange(100_000)}, Signalling(f)))
        assert signal.getsignal(signum) is interrupt                            # the handler is put back
    finally:
        signal.signal(signum, previous)
    assert torch.equal(A.load_torch(path)["w"], torch.arange(100_000))
    assert os.listdir(tmp_path) == ["state.pt"]


def test_truncated_files_are_reported(tmp_path):
    A.save_npz(tmp_path / "a.npz", x=np.arange(1000))
    data = (tmp_path / "a.npz").read_bytes()
    (tmp_path / "a.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(A.ArtifactError, match="unreadable"):
        A.load_npz(tmp_path / "a.npz")
    A.save_torch(tmp_path / "s.pt", {"w": torch.ones(100)})
    data = (tmp_path / "s.pt").read_bytes()
    (tmp_path / "s.pt").write_bytes(data[:100])
    with pytest.raises(A.ArtifactError, match="cannot be loaded"):
        A.load_torch(tmp_path / "s.pt")
    (tmp_path / "m.json").write_text('{"a": ')
    with pytest.raises(A.ArtifactError, match="not valid JSON"):
        A.read_json(tmp_path / "m.json")


def test_malicious_pickle_checkpoint_is_refused(tmp_path, capsys):
    path = tmp_path / "state.pt"
    torch.save({"model": torch.ones(2), "x": Evil()}, path)
    with pytest.raises(A.ArtifactError, match="cannot be loaded safely"):
        A.load_torch(path)
    path.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(A.ArtifactError):
        A.load_torch(path)
    assert "pwned" not in capsys.readouterr().out


def test_torch_round_trip_plain_data(tmp_path):
    obj = {"w": torch.arange(3.0), "step": 7, "rng": torch.get_rng_state(), "cfg": {"a": [1, 2]}}
    A.save_torch(tmp_path / "s.pt", obj)
    back = A.load_torch(tmp_path / "s.pt")
    assert back["step"] == 7 and torch.equal(back["w"], obj["w"]) and back["cfg"] == {"a": [1, 2]}


def test_stage_status_round_trip_and_stale_hashes(tmp_path):
    d = tmp_path / "stage1"
    A.write_json(d / "out.json", {"x": 1})
    assert M.stage_status(d, "cfg1", {"data": "fp"}) == (False, "not run yet")
    M.write_manifest(d, "cfg1", {"data": "fp"}, ["out.json"])
    assert M.stage_status(d, "cfg1", {"data": "fp"}) == (True, "done")
    assert M.stage_status(d, "cfg2", {"data": "fp"})[1] == "its config changed"
    assert M.stage_status(d, "cfg1", {"data": "other"})[1] == "its inputs changed"
    A.write_json(d / "out.json", {"x": 2})
    assert "changed since" in M.stage_status(d, "cfg1", {"data": "fp"})[1]
    (d / "out.json").unlink()
    assert "missing" in M.stage_status(d, "cfg1", {"data": "fp"})[1]
    (d / "manifest.json").write_text("{trunc")
    assert M.stage_status(d, "cfg1", {"data": "fp"}) == (False, "manifest.json is unreadable")
    A.write_json(d / "manifest.json", {"schema_version": M.SCHEMA_VERSION, "config_hash": "cfg1",
                                       "inputs": {"data": "fp"}, "outputs": ["out.json"]})
    assert M.stage_status(d, "cfg1", {"data": "fp"}) == (False, "manifest.json is malformed")


def test_reset_if_stale_drops_state_only_on_key_change(tmp_path):
    (tmp_path / "state.pt").write_bytes(b"x")
    assert M.reset_if_stale(tmp_path, {"k": 1}, ("state.pt",)) is True   # unknown key: state not trusted
    (tmp_path / "state.pt").write_bytes(b"x")
    assert M.reset_if_stale(tmp_path, {"k": 1}, ("state.pt",)) is False
    assert (tmp_path / "state.pt").exists()
    assert M.reset_if_stale(tmp_path, {"k": 2}, ("state.pt",)) is True
    assert not (tmp_path / "state.pt").exists()


def test_state_hash_is_recorded_and_checked(tmp_path):
    """A training state's sha256 is recorded beside it; a flipped bit is refused, the state it replaced (a kill
    between the record and the rename) still loads, and a changed text file is the only one rewritten."""
    path = tmp_path / "state.pt"
    A.save_state(path, {"step": 1, "w": torch.ones(64)})
    first = path.read_bytes()
    A.save_state(path, {"step": 2, "w": torch.ones(64)})
    assert A.load_state(path)["step"] == 2
    assert len((tmp_path / "state.pt.sha256").read_text().splitlines()) == 2
    path.write_bytes(first)                                 # the previous state: listed in the record
    assert A.load_state(path)["step"] == 1
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(A.ArtifactError, match="does not match the sha256 recorded"):
        A.load_state(path)
    assert M.reset_if_stale(tmp_path, {"k": 1}, ("state.pt",)) is True
    assert not (tmp_path / "state.pt.sha256").exists()


def test_unchanged_text_is_not_rewritten_and_logs_are_rebuilt(tmp_path, capsys):
    A.write_text(tmp_path / "a.txt", "same")
    before = (tmp_path / "a.txt").stat().st_ino
    A.write_text(tmp_path / "a.txt", "same")
    assert (tmp_path / "a.txt").stat().st_ino == before    # not replaced: works in a read-only directory
    (tmp_path / "stats.jsonl").write_text('{"step": 1}\nnot json\n[2]\n{"step": 3}\n{"step": 5}\n')
    assert A.read_log(tmp_path / "stats.jsonl", 4) == ['{"step": 1}', '{"step": 3}']
    assert "dropped 2 unreadable line(s)" in capsys.readouterr().err
    assert (tmp_path / "stats.jsonl").read_text() == '{"step": 1}\n{"step": 3}\n'


def test_load_cached_hits_only_its_key(tmp_path):
    path = tmp_path / "cache.npz"
    assert A.load_cached(path, "k", ("x",)) is None                          # missing
    A.save_npz(path, x=np.arange(3), key=np.array("k"))
    np.testing.assert_array_equal(A.load_cached(path, "k", ("x",))["x"], np.arange(3))
    assert A.load_cached(path, "other", ("x",)) is None                      # another key
    assert A.load_cached(path, "k", ("y",)) is None                          # lacks an array
    path.write_bytes(b"not a zip")
    assert A.load_cached(path, "k", ("x",)) is None                          # unreadable
