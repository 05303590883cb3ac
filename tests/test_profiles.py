"""Device profiles: every shipped file validates; invalid files give one line per error."""

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from semedge.runtime.profiles import (
    DeviceProfile, Efficiency, load_profile, load_profiles, profile_names, profiles_dir, update_efficiency,
    validate_file,
)
from semedge.core.errors import UserError

REQUIRED = {"watch", "raspberry-pi-5", "android-low", "android-mid", "android-flagship", "iphone",
            "jetson-nano", "jetson-orin-nano", "jetson-agx-orin", "edge-server", "host"}


def test_shipped_profiles_validate():
    names = set(profile_names())
    assert REQUIRED <= names
    for n in names:
        assert validate_file(profiles_dir() / f"{n}.yaml") == [], n
    profs = load_profiles()
    # budgets differ a lot: the watch only fits a heavily compressed encoder
    assert profs["watch"].memory_budget_mb <= 60
    assert profs["edge-server"].memory_budget_mb > 100 * profs["watch"].memory_budget_mb
    for p in profs.values():
        if p.device_class != "host":
            assert any(s.startswith("https://") for s in p.sources), p.name
            text = (profiles_dir() / f"{p.name}.yaml").read_text()
            assert text.lstrip().startswith("#"), f"{p.name}: sources comment missing"


def _write(tmp_path, data, name="dev"):
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def _good():
    d = load_profile("raspberry-pi-5").model_dump(mode="json", exclude_none=True)
    d["name"] = "dev"
    return d


@pytest.mark.parametrize("mutate, field, allowed", [
    (lambda d: d.pop("memory_budget_mb"), "memory_budget_mb", "allowed:"),
    (lambda d: d.update(memory_budget_mb=-5), "memory_budget_mb", "> 0"),
    (lambda d: d.update(memory_budget_mb="512 MB"), "memory_budget_mb", "in MB"),
    (lambda d: d.update(memory_budget_gb=1, memory_budget_mb=1024), "memory_budget_gb", "memory_budget_mb"),
    (lambda d: d.update(execution_providers=["CPU", "OpenVINO"]), "execution_providers.1.name", "'CoreML'"),
    (lambda d: d.update(cores="four"), "cores", "an integer"),
    (lambda d: d["link"].update(channel="ricean"), "link.channel", "'rician'"),
    (lambda d: d["link"].update(snr_db=[20, 5]), "link.snr_db", "allowed"),
    (lambda d: d["peak_gflops"].pop("int8"), "peak_gflops.int8", "allowed"),
    (lambda d: d.update(threads=64), "(file)", "allowed"),
    (lambda d: d.update(execution_providers=[{"name": "TensorRT", "options": {"fp16": True}}, "CPU"]),
     "execution_providers.0", "trt_fp16_enable"),
    (lambda d: d.update(execution_providers=[{"name": "QNN", "options": {"htp_performance_mode": "fast"}}]),
     "execution_providers.0", "burst"),
    (lambda d: d.update(execution_providers=[{"name": "CoreML", "option": {}}]), "execution_providers.0.option",
     "options"),
    (lambda d: d.update(execution_providers=["CPU", "CPU"]), "(file)", "twice"),
    (lambda d: d.update(accelerators={"tpu": {"fp32": 1, "fp16": 1, "int8": 1}}), "accelerators.tpu", "'npu'"),
])
def test_invalid_profile_errors(tmp_path, mutate, field, allowed):
    d = _good()
    mutate(d)
    p = _write(tmp_path, d)
    errs = validate_file(p)
    assert errs, "should be invalid"
    line = next((e for e in errs if f": {field}:" in e), None)
    assert line is not None, errs
    assert line.startswith(str(p)) and allowed in line, line
    with pytest.raises(UserError):
        load_profile(p)


def test_name_must_match_file(tmp_path):
    p = _write(tmp_path, _good(), name="other")
    assert "name" in validate_file(p)[0]


def test_not_yaml_mapping(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text("- a\n- b\n")
    assert validate_file(p) and "mapping" in validate_file(p)[0]


def test_unknown_profile_name():
    with pytest.raises(UserError, match="unknown device profile"):
        load_profile("no-such-device")


def test_env_override(tmp_path, monkeypatch):
    _write(tmp_path, _good())
    monkeypatch.setenv("SEMEDGE_PROFILES", str(tmp_path))
    assert profile_names() == ["dev"]
    assert load_profile("dev").cores == 4


def test_update_efficiency_keeps_comments(tmp_path):
    src = profiles_dir() / "watch.yaml"
    p = tmp_path / "watch.yaml"
    p.write_text(src.read_text())
    update_efficiency(p, Efficiency(matmul_fp32=0.5, overhead_us_per_node=3.0, calibrated_on="t"))
    text = p.read_text()
    assert text.startswith("# Smartwatch") and "Sources" in text
    prof = DeviceProfile.model_validate(yaml.safe_load(text))
    assert prof.efficiency.matmul_fp32 == 0.5 and prof.efficiency.overhead_us_per_node == 3.0
    update_efficiency(p, Efficiency(matmul_fp32=0.7))  # replaced, not appended twice
    assert p.read_text().count("efficiency:") == 1


def test_cli_validate_exit_code(tmp_path):
    from semedge.cli import app

    d = _good()
    d["memory_budget_mb"] = -1
    d["execution_providers"] = ["CPU", "DirectML"]
    bad = _write(tmp_path, d)
    r = CliRunner().invoke(app, ["profiles", "validate", str(profiles_dir() / "watch.yaml"), str(bad)])
    assert r.exit_code == 2
    err_lines = [ln for ln in r.output.splitlines() if ln.startswith(str(bad))]
    assert len(err_lines) == 2 and all("allowed" in ln for ln in err_lines)
    r = CliRunner().invoke(app, ["profiles", "validate", str(profiles_dir() / "watch.yaml")])
    assert r.exit_code == 0


def test_cli_list_and_show():
    from semedge.cli import app

    r = CliRunner().invoke(app, ["profiles", "list"])
    assert r.exit_code == 0 and "jetson-orin-nano" in r.output
    r = CliRunner().invoke(app, ["profiles", "show", "watch", "--json"])
    assert r.exit_code == 0 and '"memory_budget_mb": 48' in r.output


def test_device_side_imports_no_torch():
    import subprocess
    import sys

    code = ("import sys; import semedge.runtime.profiles, semedge.runtime.costmodel, semedge.runtime.profiler; "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent.parent)


def test_profiles_carry_eps_in_priority_order_with_options():
    """The first EP is the one a package is built for; ORT names are ORT's (XnnpackExecutionProvider)."""
    profs = load_profiles()
    first = {n: p.first_ep.name for n, p in profs.items()}
    assert first["android-flagship"] == "QNN" and first["android-mid"] == "NNAPI" and first["iphone"] == "CoreML"
    assert first["jetson-orin-nano"] == "TensorRT" and first["watch"] == "XNNPACK" and first["host"] == "CPU"
    for p in profs.values():
        assert p.ep_names[-1] == "CPU", p.name  # the fallback for nodes no accelerator takes
    orin = profs["jetson-orin-nano"]
    assert orin.ort_providers() == ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert orin.ort_provider_options()[0]["trt_fp16_enable"] == "1"
    assert orin.first_ep.unit == "gpu" and orin.unit_peaks("gpu")[0].fp16 > orin.unit_peaks("cpu")[0].fp16
    assert profs["watch"].ort_providers()[0] == "XnnpackExecutionProvider"
    assert profs["android-flagship"].first_ep.unit == "npu" and profs["android-flagship"].unit_peaks("npu") is None


def test_shorthand_and_full_ep_entries_are_the_same():
    a = DeviceProfile.model_validate({**_good(), "execution_providers": ["XNNPACK", "CPU"]})
    b = DeviceProfile.model_validate({**_good(), "execution_providers": [{"name": "XNNPACK"}, {"name": "CPU"}]})
    assert a.execution_providers == b.execution_providers
