"""`runtime.precision: auto` and the bf16 check: the precision a run computes in follows the machine's hardware."""
import pytest
import torch

from dualpseudo import runtime
from dualpseudo.cli import main
from dualpseudo.config import ExperimentConfig, load_config, to_yaml

from conftest import ROOT, make_idx_dataset

CPU = torch.device("cpu")


@pytest.fixture
def bf16_cpu(monkeypatch):
    """Pretend this CPU has (True) or lacks (False) native bf16; returns the setter."""
    def set_native(native: bool):
        monkeypatch.setattr(runtime, "native_bf16", lambda device: native)
        monkeypatch.setattr(runtime, "_warned", set())
    return set_native


@pytest.mark.parametrize("native, expected", [(True, "bf16"), (False, "fp32")])
def test_auto_picks_bf16_only_where_native(bf16_cpu, native, expected, capsys):
    bf16_cpu(native)
    assert runtime.resolve_precision("auto", CPU) == expected
    assert runtime.resolve_precision("fp32", CPU) == "fp32"
    assert capsys.readouterr().err == ""


def test_explicit_bf16_on_an_emulating_cpu_is_kept_and_warned_once(bf16_cpu, capsys):
    bf16_cpu(False)
    assert runtime.resolve_precision("bf16", CPU) == "bf16"
    assert runtime.resolve_precision("bf16", CPU) == "bf16"
    err = capsys.readouterr().err
    assert err.startswith("warning: runtime.precision=bf16") and err.count("\n") == 1
    bf16_cpu(True)
    assert runtime.resolve_precision("bf16", CPU) == "bf16" and capsys.readouterr().err == ""


def test_native_bf16_answers_for_this_machine():
    assert isinstance(runtime.native_bf16(CPU), bool)
    assert runtime.native_bf16(torch.device("meta")) is False
    if not torch.cuda.is_available():
        assert runtime.native_bf16(torch.device("cuda")) is False


def test_resolve_config(bf16_cpu):
    cfg = ExperimentConfig()
    assert cfg.runtime.precision == "auto"                              # the default
    bf16_cpu(False)
    assert runtime.resolve_config(cfg).runtime.precision == "fp32"
    bf16_cpu(True)
    resolved = runtime.resolve_config(cfg)
    assert resolved.runtime.precision == "bf16" and resolved.stage2 == cfg.stage2
    if not torch.cuda.is_available():                                   # an absent device: left for its own error
        gpu = load_config(None, ["runtime.device=cuda"])
        assert runtime.resolve_config(gpu).runtime.precision == "auto"


def test_autocast_refuses_an_unresolved_precision():
    with pytest.raises(ValueError, match="resolve `auto` first"):
        runtime.autocast(CPU, "auto")
    with runtime.autocast(CPU, "fp32"):
        assert torch.ones(2, 2).matmul(torch.ones(2, 2)).dtype == torch.float32


@pytest.mark.parametrize("native, expected", [(True, "bf16"), (False, "fp32")])
def test_the_run_records_the_resolved_precision(bf16_cpu, native, expected, tmp_path, capsys):
    """The demo config (precision auto) on a stand-in dataset: the plan shows the precision the stages will use."""
    bf16_cpu(native)
    root = make_idx_dataset(tmp_path / "fashion-mnist", n=300, test=20)
    assert main(["run", str(ROOT / "configs" / "fashion_mnist.yaml"), "--run-dir", str(tmp_path / "r"), "--dry-run",
                   "--set", f"data.root={root}", "--set", f"evaluation.cache_dir={tmp_path / 'cache'}"]) == 0
    out = capsys.readouterr().out
    assert f"precision: {expected}" in out and "precision: auto" not in out
    assert "precision: auto" in to_yaml(load_config(ROOT / "configs" / "fashion_mnist.yaml"))


def test_a_run_says_and_records_what_auto_resolved_to(bf16_cpu, tmp_path, capsys):
    """Stage 1 of the smoke config with precision auto on a CPU without native bf16: one line says fp32, and the
    run directory's config holds fp32 (what the stage hashes and the encoder cache key see)."""
    from conftest import SMOKE

    bf16_cpu(False)
    run = tmp_path / "run"
    assert main(["stage1", SMOKE, "--run-dir", str(run), "--set", "runtime.precision=auto",
                 "--set", f"evaluation.cache_dir={tmp_path / 'cache'}"]) == 0
    assert "runtime.precision: auto -> fp32 (no native bf16 on cpu)" in capsys.readouterr().out
    assert load_config(run / "config.yaml").runtime.precision == "fp32"
