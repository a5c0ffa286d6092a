# Copyright The nl_lightning developers.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""scripts/gpu_check.sh and scripts/gpu_check.py on the CPU: the shell syntax, the ``--cpu-dry-run`` of every
section (tiny sizes, CPU GradScaler, gloo), and what decides a status (peak-rate table, exit codes, recipe builder)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT_SH = REPO / "scripts" / "gpu_check.sh"
SCRIPT_PY = REPO / "scripts" / "gpu_check.py"
GPU_RECIPES = sorted(p.stem for p in (REPO / "nl_lightning" / "recipes").glob("gpu_text_*.yaml"))


def _load_script():
    spec = importlib.util.spec_from_file_location("gpu_check_under_test", SCRIPT_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_check = _load_script()


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """One dry run of every section through the shell script: (exit status, report, output directory, output)."""
    out = tmp_path_factory.mktemp("gpu_check")
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("OUT", None)
    proc = subprocess.run(
        ["bash", str(SCRIPT_SH), str(out), "--cpu-dry-run"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    path = out / "gpu_check.json"
    assert path.is_file(), f"no JSON written; exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.returncode, json.loads(path.read_text()), out, proc.stdout + proc.stderr


def test_shell_script_parses():
    proc = subprocess.run(["bash", "-n", str(SCRIPT_SH)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_out_variable_is_the_default_directory(tmp_path):
    """Without a directory argument the results go to ``$OUT`` (the device tool's folder); one section, one recipe."""
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "OUT": str(tmp_path / "out")}
    args = ["--cpu-dry-run", "--sections", "recipes", "--recipes", "gpu_text_transformer"]
    cmd = ["bash", str(SCRIPT_SH), *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert list(report["sections"]) == ["recipes"]
    assert list(report["sections"]["recipes"]["checks"]) == ["gpu_text_transformer"]
    assert (tmp_path / "out" / "gpu_check.log").is_file()


def test_dry_run_report_and_exit_status(dry_run):
    code, report, out, output = dry_run
    assert report["mode"] == "cpu-dry-run"
    assert list(report["sections"]) == ["precision", "strategies", "recipes"]
    assert code == report["exit_code"] == gpu_check.exit_code(report), output[-3000:]
    assert report["status"] == {0: "pass", 1: "fail", 2: "unavailable"}[code]
    assert (out / "gpu_check.log").read_text().strip().endswith(f"({report['wall_s']:.0f} s)")
    for section in report["sections"].values():
        for check in section["checks"].values():
            assert check["status"] in gpu_check.STATUSES


def _failed(section):
    return {n: c.get("error") or c.get("failures") for n, c in section["checks"].items() if c["status"] != "pass"}


def test_dry_run_precision_section(dry_run):
    checks = dry_run[1]["sections"]["precision"]["checks"]
    assert set(checks) == {
        "bf16_mixed",
        "fp16_injected_overflow",
        "fp16_trainer_scaler",
        "fused_adamw_bf16",
        "fused_adamw_fp16_refused",
    }
    assert not _failed(dry_run[1]["sections"]["precision"])
    for name in ("bf16_mixed", "fp16_injected_overflow", "fp16_trainer_scaler", "fused_adamw_bf16"):
        assert checks[name]["bitwise_equal"] is True  # on the CPU the callback is exact, as in test_multi_frequency.py
    overflow = checks["fp16_injected_overflow"]
    assert overflow["moved"]["callback"]["net.0.weight"] == [4, 7, 11]
    assert overflow["skipped_steps"] == [3, 8]
    assert overflow["scale_final"] == overflow["reference_scale_final"] < overflow["scale_init"] == 1024
    clocks = overflow["skipped_step_clocks"]
    assert clocks["3"]["counts_before"] == clocks["3"]["counts_after"] == {"slow": 2, "mid": 0}
    assert checks["fused_adamw_bf16"]["optimizer"] == "fused_adamw"
    assert "fused=False" in checks["fused_adamw_fp16_refused"]["message"]


def test_dry_run_strategies_section(dry_run):
    section = dry_run[1]["sections"]["strategies"]
    checks = section["checks"]
    assert set(checks) == {"nested_ddp_bf16", "nested_ddp_fp16_injected_overflow", "fsdp2_bf16"}
    assert checks["fsdp2_bf16"]["status"] == "pass", checks["fsdp2_bf16"]
    assert checks["fsdp2_bf16"]["strategy"] == "ModelParallelStrategy"
    assert checks["fsdp2_bf16"]["bitwise_equal"] is True
    if importlib.util.find_spec("nl_lightning.strategies") is None:  # recorded as unavailable, never as a pass
        for name in ("nested_ddp_bf16", "nested_ddp_fp16_injected_overflow"):
            assert checks[name]["status"] == "unavailable"
            assert "nl_lightning.strategies" in checks[name]["error"]
        return
    assert not _failed(section)
    for name in ("nested_ddp_bf16", "nested_ddp_fp16_injected_overflow"):
        assert checks[name]["strategy"] == "NestedDDPStrategy"
        assert checks[name]["bitwise_equal"] is True
    assert checks["nested_ddp_fp16_injected_overflow"]["skipped_steps"] == [3, 8]


def test_dry_run_recipes_section(dry_run):
    section = dry_run[1]["sections"]["recipes"]
    assert sorted(section["checks"]) == GPU_RECIPES and len(GPU_RECIPES) == 4
    assert not _failed(section)
    for check in section["checks"].values():
        assert check["steps_run"] == check["steps_requested"] == 6
        assert check["timed_steps"] == 3
        assert check["tokens_per_step"] == 2 * 64
        assert check["tokens_per_s"] > 0 and check["flops_per_step"] > 0
        assert check["precision"] == "bf16-mixed"
        assert check["mfu"] is None and check["peak_source"].startswith("unknown device")
        assert check["peak_memory_allocated_bytes"] is None


def test_peak_rate_table():
    assert gpu_check.peak_bf16_tflops("NVIDIA H100 80GB HBM3")[0] == 989.5
    assert gpu_check.peak_bf16_tflops("NVIDIA H100 PCIe")[0] == 756.5
    assert gpu_check.peak_bf16_tflops("NVIDIA H200")[0] == 989.5
    for nvl in ("NVIDIA H100 NVL", "NVIDIA H200 NVL"):  # no rate recorded: no utilisation, not the SXM rate
        rate, source = gpu_check.peak_bf16_tflops(nvl)
        assert rate is None and "--peak-tflops" in source
    rate, source = gpu_check.peak_bf16_tflops("NVIDIA GeForce RTX 4090")
    assert rate is None and "unknown device 'NVIDIA GeForce RTX 4090'" in source and "--peak-tflops" in source
    assert gpu_check.peak_bf16_tflops(None)[0] is None
    assert gpu_check.peak_bf16_tflops("NVIDIA GeForce RTX 4090", override=165.0) == (
        165.0,
        "--peak-tflops on the command line",
    )


def test_statuses_and_exit_codes():
    def failing(expect):
        expect.that(1 == 2, "one is not two")

    def raising(expect):
        raise RuntimeError("boom")

    assert gpu_check.run_check(lambda e: e.that(True, "unused"))["status"] == "pass"
    failed = gpu_check.run_check(failing)
    assert failed["status"] == "fail" and failed["failures"] == ["one is not two"]
    errored = gpu_check.run_check(raising)
    assert errored["status"] == "error" and errored["error"] == "RuntimeError: boom"
    missing = gpu_check.strategy_checks(gpu_check.Target(True), nested_ddp=("nl_lightning.no_such_module", "X"))
    unavailable = gpu_check.run_check(missing["nested_ddp_bf16"])
    assert unavailable["status"] == "unavailable" and "nl_lightning.no_such_module" in unavailable["error"]

    def report(*statuses):
        checks = {str(i): {"status": s} for i, s in enumerate(statuses)}
        return {"sections": {"a": {"checks": checks}}}

    assert gpu_check.exit_code(report("pass", "pass")) == 0
    assert gpu_check.exit_code(report("pass", "unavailable")) == 2
    assert gpu_check.exit_code(report("unavailable", "fail")) == 1
    assert gpu_check.exit_code(report("pass", "error")) == 1


def test_a_criterion_that_does_not_hold_fails(tmp_path, monkeypatch):
    """The equivalence check is not a formality: a wrong expected schedule, or a reference whose slow level has another
    period than the callback's, is reported as a failure naming what differs."""
    monkeypatch.chdir(tmp_path)
    target = gpu_check.Target(True)
    wrong = gpu_check.run_check(
        lambda e: gpu_check.equivalence(e, target, precision="bf16-mixed", steps=6, expected_slow=[2, 4, 6])
    )
    assert wrong["status"] == "fail"
    assert wrong["failures"] == ["the slow level moved at [3, 6], expected [2, 4, 6]"]
    monkeypatch.setattr(gpu_check, "PERIODS", {**gpu_check.PERIODS, "net.0.weight": 2, "net.0.bias": 2})
    mismatch = gpu_check.run_check(lambda e: gpu_check.equivalence(e, target, precision="bf16-mixed", steps=6))
    assert mismatch["status"] == "fail" and mismatch["max_abs_diff"] > gpu_check.TOLERANCE
    assert "net.0.weight moved at steps [3, 6], the reference at [2, 4, 6]" in mismatch["failures"]


def test_recipes_built_from_yaml_match_the_cli(tmp_path, monkeypatch):
    """The check builds each recipe from its YAML without the CLI (jsonargparse may be missing on a GPU machine):
    the same model class and the same initial weights as ``nl-lightning fit --config <recipe>``."""
    from nl_lightning.cli import main

    monkeypatch.chdir(tmp_path)  # nothing the CLI might write lands in the repository
    monkeypatch.setattr(sys, "argv", ["nl-lightning"])

    for name in GPU_RECIPES:
        path = REPO / "nl_lightning" / "recipes" / f"{name}.yaml"
        model, data, trainer_args, _ = gpu_check.build_recipe(path, dry_run=False)
        cli = main(["--config", str(path), "--trainer.accelerator=cpu", "--trainer.logger=false"], run=False)
        assert type(model) is type(cli.model) and type(data) is type(cli.datamodule)
        ours, theirs = model.state_dict(), cli.model.state_dict()
        assert list(ours) == list(theirs)
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), name
        assert (data.seq_len, data.batch_size) == (cli.datamodule.seq_len, cli.datamodule.batch_size) == (2048, 16)
        assert trainer_args == {"accelerator": "gpu", "devices": 1, "precision": "bf16-mixed"}
