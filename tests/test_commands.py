"""The run-directory commands (commands.py) on directories without the files they need, and the pipeline's
rebuild of a step's own damaged file (`_run_step`), decided by the file the ArtifactError names."""
from pathlib import Path

import pytest

from dualpseudo import commands
from dualpseudo.artifacts import ArtifactError
from dualpseudo.distributed import LOCAL
from dualpseudo.rundir import RunDir, RunDirError
from dualpseudo.stages.pipeline import Step, _run_step

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"


@pytest.fixture
def configured(tmp_path):
    """A run directory holding only its config (nothing has run)."""
    run = RunDir(tmp_path / "run")
    run.root.mkdir()
    run.config.write_text(SMOKE.read_text())
    return run


def test_commands_refuse_a_directory_that_is_not_a_run(tmp_path):
    for call in (lambda: commands.write_report(tmp_path),
                 lambda: commands.evaluate_run(tmp_path, []),
                 lambda: commands.sample_grid(tmp_path, per_class=1, out=None, guidance_scale=None, steps=None,
                                              sampler=None, seed=0)):
        with pytest.raises(RunDirError, match="not a run directory"):
            call()


def test_sample_and_eval_name_the_stage_they_need(configured):
    with pytest.raises(ArtifactError, match="diffusion.safetensors does not exist; run `dualpseudo stage2`"):
        commands.sample_grid(configured.root, per_class=1, out=None, guidance_scale=None, steps=None,
                             sampler=None, seed=0)
    with pytest.raises(RunDirError, match="has no pseudo_images.npz; run stage 2 first"):
        commands.evaluate_run(configured.root, [])


def test_report_of_a_run_that_has_not_started(configured, capsys):
    assert commands.write_report(configured.root) == 0
    assert capsys.readouterr().out.strip() == str(configured.report_html)
    assert "Stage 1 not run yet (no stage1/metrics.json)." in configured.report_md.read_text()


def _step(folder: Path, run) -> Step:
    return Step("stage2", folder, "hash", lambda: {}, ("x.npz",), run)


def test_a_step_rebuilds_the_own_file_its_error_names(tmp_path, capsys):
    bad = tmp_path / "stage2" / "chunks" / "chunk_0001.npz"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"damaged")
    calls = []

    def run() -> dict:
        calls.append(bad.is_file())
        if bad.is_file():
            raise ArtifactError("the chunk is unreadable", bad)
        return {"ok": True}

    assert _run_step(_step(tmp_path / "stage2", run), LOCAL) == {"ok": True}
    assert calls == [True, False]
    assert "[stage2] warning: the chunk is unreadable; deleted chunk_0001.npz, rebuilding" in capsys.readouterr().err


@pytest.mark.parametrize("where", ["none", "outside", "missing"])
def test_a_step_does_not_delete_what_its_error_does_not_name_as_its_own(tmp_path, where):
    own = tmp_path / "stage2" / "state.pt"
    own.parent.mkdir()
    own.write_bytes(b"state")
    other = tmp_path / "stage1" / "pseudo_labels.npz"
    other.parent.mkdir()
    other.write_bytes(b"labels")
    path = {"none": None, "outside": other, "missing": tmp_path / "stage2" / "gone.pt"}[where]

    def run() -> dict:                       # the message names a file of the step, the error does not
        raise ArtifactError(f"{own} and {other} are unusable", path)

    with pytest.raises(ArtifactError):
        _run_step(_step(tmp_path / "stage2", run), LOCAL)
    assert own.is_file() and other.is_file()
