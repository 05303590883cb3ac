"""Device profiles: the schema, loading and validation.

A profile is one YAML file per device under `device_profiles/` at the repo root
(override the folder with the env var `SEMEDGE_PROFILES`). Units are in the
field names. Only numpy/pydantic/yaml here: this runs on a device.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from semedge.core.errors import UserError
from semedge.core.files import write_atomic
from semedge.runtime.providers import (
    EXECUTION_PROVIDERS, PROVIDER_OPTIONS, PROVIDER_VALUES, ort_name, unit_of,
)

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PeakGflops(_Strict):
    """Peak throughput in GFLOP/s (GOP/s for int8) of the CPU cores ORT's CPU EP runs on
    (with `threads`); accelerators carry their own under `accelerators`."""

    fp32: float = Field(gt=0)
    fp16: float = Field(gt=0)
    int8: float = Field(gt=0)


class ExecutionProvider(_Strict):
    """One EP of a profile: its name (profile spelling, e.g. TensorRT) and its provider options."""

    name: Literal["CPU", "XNNPACK", "NNAPI", "QNN", "CoreML", "CUDA", "TensorRT"]
    options: dict[str, str | bool | int | float] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _known_options(self):
        allowed = PROVIDER_OPTIONS[self.name]
        for key, value in self.options.items():
            if key not in allowed:
                raise ValueError(f"unknown option '{key}' for {self.name} "
                                 f"(allowed: {', '.join(allowed) or 'none'})")
            values = PROVIDER_VALUES.get((self.name, key))
            if values and str(value) not in values:
                raise ValueError(f"{self.name} option {key}={value!r} (allowed: {', '.join(values)})")
        return self

    @property
    def ort_name(self) -> str:
        return ort_name(self.name)

    @property
    def unit(self) -> str:
        """The compute unit it runs nodes on: cpu, gpu or npu."""
        return unit_of(self.name, self.options)

    def ort_options(self) -> dict[str, str]:
        """Options as ORT's Python API takes them (strings; booleans as 1/0)."""
        return {k: (str(int(v)) if isinstance(v, bool) else str(v)) for k, v in self.options.items()}


class Link(_Strict):
    uplink_mbps: float = Field(gt=0)
    snr_db: tuple[float, float]
    channel: Literal["awgn", "rayleigh", "rician"]

    @field_validator("snr_db")
    @classmethod
    def _ordered(cls, v):
        if v[0] > v[1]:
            raise ValueError("snr_db must be [min, max] with min <= max")
        if v[0] < -20 or v[1] > 60:
            raise ValueError("snr_db outside -20..60 dB")
        return v


class Efficiency(_Strict):
    """Fitted factors (achieved / peak) per cost-model class, plus fixed costs.

    Unset factors fall back to the cost model's defaults.
    """

    matmul_fp32: float | None = Field(default=None, gt=0)
    matmul_fp16: float | None = Field(default=None, gt=0)
    matmul_int8: float | None = Field(default=None, gt=0)
    matmul_int4: float | None = Field(default=None, gt=0)
    attention: float | None = Field(default=None, gt=0)
    conv: float | None = Field(default=None, gt=0)
    memory: float | None = Field(default=None, gt=0)
    dequant: float | None = Field(default=None, gt=0)
    weights: float | None = Field(default=None, gt=0)
    overhead_us_per_node: float | None = Field(default=None, ge=0)
    fixed_ms: float | None = Field(default=None, ge=0)
    runtime_mb: float | None = Field(default=None, ge=0)
    session_mb: float | None = Field(default=None, ge=0)
    arena_factor: float | None = Field(default=None, ge=0)
    weights_factor: float | None = Field(default=None, ge=0)
    calibrated_on: str | None = None


class UnitPeaks(_Strict):
    """An accelerator (GPU, NPU) ORT reaches through an EP: its peaks, its memory, its fit."""

    fp32: float = Field(gt=0)
    fp16: float = Field(gt=0)
    int8: float = Field(gt=0)
    mem_bandwidth_gbs: float | None = Field(default=None, gt=0)  # None: the profile's (shared memory)
    efficiency: Efficiency = Field(default_factory=Efficiency)  # fitted on this unit only


class DeviceProfile(_Strict):
    name: str = Field(min_length=1)
    device_class: Literal["phone", "jetson", "watch", "sbc", "server", "host"]
    description: str = ""
    memory_budget_mb: float = Field(gt=0)
    peak_gflops: PeakGflops
    mem_bandwidth_gbs: float = Field(gt=0)
    cores: int = Field(ge=1)
    threads: int = Field(ge=1)
    # priority order: the first is the EP the package is built for; ORT falls back along the list
    execution_providers: list[ExecutionProvider] = Field(min_length=1)
    accelerators: dict[Literal["gpu", "npu"], UnitPeaks] = Field(default_factory=dict)
    latency_budget_ms: float = Field(gt=0)
    link: Link
    efficiency: Efficiency = Field(default_factory=Efficiency)
    sources: list[str] = Field(min_length=1)
    measured_on: str | None = None

    @field_validator("execution_providers", mode="before")
    @classmethod
    def _names_to_entries(cls, v):
        """`[TensorRT, CPU]` is shorthand for `[{name: TensorRT}, {name: CPU}]`."""
        return [{"name": e} if isinstance(e, str) else e for e in v] if isinstance(v, list) else v

    @model_validator(mode="after")
    def _consistent(self):
        if self.threads > self.cores:
            raise ValueError(f"threads ({self.threads}) > cores ({self.cores})")
        names = [e.name for e in self.execution_providers]
        if len(set(names)) != len(names):
            raise ValueError(f"execution_providers lists an EP twice ({', '.join(names)})")
        return self

    @property
    def ep_names(self) -> list[str]:
        return [e.name for e in self.execution_providers]

    @property
    def first_ep(self) -> ExecutionProvider:
        """The EP the package is built for."""
        return self.execution_providers[0]

    def ort_providers(self) -> list[str]:
        """ORT provider names for this profile's EPs (as passed to InferenceSession)."""
        return [e.ort_name for e in self.execution_providers]

    def ort_provider_options(self) -> list[dict[str, str]]:
        """Per EP, its options as ORT takes them (same order as ort_providers)."""
        return [e.ort_options() for e in self.execution_providers]

    def unit_peaks(self, unit: str) -> tuple[PeakGflops | UnitPeaks, float] | None:
        """(peaks, bandwidth GB/s) of a compute unit; None for an accelerator the profile has no peaks for."""
        if unit == "cpu":
            return self.peak_gflops, self.mem_bandwidth_gbs
        acc = self.accelerators.get(unit)
        return None if acc is None else (acc, acc.mem_bandwidth_gbs or self.mem_bandwidth_gbs)


# ---------------------------------------------------------------- locations


def profiles_dir() -> Path:
    """The profiles folder: $SEMEDGE_PROFILES, else `device_profiles/` at the repo root."""
    env = os.environ.get("SEMEDGE_PROFILES")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent / "device_profiles"


def profile_names(directory: str | Path | None = None) -> list[str]:
    d = Path(directory) if directory else profiles_dir()
    return sorted(p.stem for p in d.glob("*.yaml"))


# ---------------------------------------------------------------- errors

def _fields_at(loc: tuple) -> list[str]:
    """Names of the fields allowed at the schema level of `loc` (minus its last part)."""
    model: type[BaseModel] | None = DeviceProfile
    for part in loc[:-1]:
        if isinstance(part, int) or (model is None and part in ("gpu", "npu")):
            continue  # a list index or a dict key: the item's model is already current
        if model is None or part not in model.model_fields:
            return []
        ann = model.model_fields[part].annotation
        args = [a for a in get_args(ann) if isinstance(a, type) and issubclass(a, BaseModel)]
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else (args[0] if args else None)
    return list(model.model_fields) if model else []


def _allowed(err: dict) -> str:
    t = err["type"]
    ctx = err.get("ctx") or {}
    if t == "extra_forbidden":
        return "fields: " + ", ".join(_fields_at(tuple(err["loc"])))
    if t == "literal_error":
        return str(ctx.get("expected", ""))
    if t == "missing":
        return "see docs/profiles.md"
    if t in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        op = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}[t]
        bound = next(iter(ctx.values()), "")
        return f"a number {op} {bound}"
    if t in ("float_parsing", "float_type", "int_parsing", "int_type", "int_from_float"):
        loc = ".".join(str(p) for p in err["loc"])
        unit = _unit_of(loc)
        kind = "an integer" if t.startswith("int") else "a plain number"
        return f"{kind}{' in ' + unit if unit else ''}, no unit suffix"
    if t in ("too_short", "too_long", "tuple_type", "list_type"):
        return "a list" + (f" of at least {ctx['min_length']} item(s)" if "min_length" in ctx else "")
    return "see docs/profiles.md"


def _unit_of(loc: str) -> str:
    for suffix, unit in (("_mb", "MB"), ("_gbs", "GB/s"), ("_ms", "ms"), ("_mbps", "Mb/s"), ("snr_db", "dB")):
        if loc.split(".")[0].endswith(suffix) or loc.endswith(suffix) or suffix in loc:
            return unit
    if loc.startswith("peak_gflops"):
        return "GFLOP/s"
    return ""


def format_errors(path: str | Path, exc: ValidationError) -> list[str]:
    out = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"] if p != "[key]") or "(file)"
        msg = err["msg"].removeprefix("Value error, ")
        tail = "" if "(allowed:" in msg else f" (allowed: {_allowed(err)})"
        out.append(f"{path}: {field}: {msg}{tail}")
    return out


# ---------------------------------------------------------------- load / validate


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: no such profile file", "check the path or run `semedge profiles list`")
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({e.__class__.__name__})", "fix the YAML syntax")
    if not isinstance(data, dict):
        raise UserError(f"{path}: (file): a profile must be a YAML mapping", "see docs/profiles.md")
    return data


def validate_file(path: str | Path) -> list[str]:
    """One line per error (`file: field: message (allowed: ...)`); [] when the file is valid."""
    p = Path(path)
    try:
        data = _read_yaml(p)
    except UserError as e:
        return [e.problem]
    try:
        prof = DeviceProfile.model_validate(data)
    except ValidationError as e:
        return format_errors(p, e)
    if prof.name != p.stem:
        return [f"{p}: name: '{prof.name}' differs from the file name (allowed: '{p.stem}')"]
    return []


def load_profile(name_or_path: str | Path) -> DeviceProfile:
    """Load by name (from profiles_dir()) or by path to a .yaml file; UserError if invalid."""
    s = str(name_or_path)
    p = Path(s)
    if not (s.endswith((".yaml", ".yml")) or p.is_file()):
        p = profiles_dir() / f"{s}.yaml"
        if not p.is_file():
            names = ", ".join(profile_names()) or "(none)"
            raise UserError(f"unknown device profile '{s}'", f"use one of: {names}, or a path to a .yaml file")
    errs = validate_file(p)
    if errs:
        raise UserError(errs[0] + (f" (+{len(errs) - 1} more)" if len(errs) > 1 else ""),
                        f"run `semedge profiles validate {p}`")
    return DeviceProfile.model_validate(_read_yaml(p))


def load_profiles(directory: str | Path | None = None) -> dict[str, DeviceProfile]:
    d = Path(directory) if directory else profiles_dir()
    return {n: load_profile(d / f"{n}.yaml") for n in profile_names(d)}


def dump_profile(prof: DeviceProfile, path: str | Path, header: str = "") -> Path:
    """Write a profile as YAML atomically; `header` becomes leading comment lines."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    data = prof.model_dump(mode="json", exclude_none=True)
    if not data.get("efficiency"):
        data.pop("efficiency", None)
    if not data.get("accelerators"):
        data.pop("accelerators", None)
    # an EP without options in its short form: `[XNNPACK, CPU]`
    data["execution_providers"] = [e if e["options"] else e["name"] for e in data["execution_providers"]]
    text = "".join(f"# {line}\n" if line else "#\n" for line in header.splitlines())
    text += yaml.safe_dump(data, sort_keys=False, default_flow_style=None)
    return write_atomic(p, text)


def update_efficiency(path: str | Path, efficiency: Efficiency) -> Path:
    """Replace the `efficiency:` block of a profile file, keeping its source comments."""
    p = Path(path)
    lines = p.read_text().splitlines(keepends=True)
    out, skip = [], False
    for line in lines:
        if line.startswith("efficiency:"):
            skip = True
            continue
        if skip and (line.startswith((" ", "\t")) or not line.strip()):
            continue
        skip = False
        out.append(line)
    if out and not out[-1].endswith("\n"):
        out[-1] += "\n"
    block = yaml.safe_dump({"efficiency": efficiency.model_dump(mode="json", exclude_none=True)},
                           sort_keys=False)
    text = "".join(out) + block
    DeviceProfile.model_validate(yaml.safe_load(text))  # never write an invalid file
    return write_atomic(p, text)
