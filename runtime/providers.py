"""ONNX Runtime execution providers: names, provider options, compute units, what each EP takes.

Pure standard library (it runs on a device). Option keys are the ones ORT's provider
options take (docs: onnxruntime.ai/docs/execution-providers/<EP>-ExecutionProvider.html);
NNAPI has no key/value options in ORT, only bit flags (NNAPI_FLAG_*), so its keys here are
the flag names in lower case, which a runner turns into the flags its API takes.
"""

from __future__ import annotations

import warnings

from semedge.core.errors import UserError

EXECUTION_PROVIDERS = ("CPU", "XNNPACK", "NNAPI", "QNN", "CoreML", "CUDA", "TensorRT")
UNITS = ("cpu", "gpu", "npu")

# Profile spelling -> ORT's provider name (what InferenceSession takes).
ORT_NAMES = {
    "CPU": "CPUExecutionProvider",
    "XNNPACK": "XnnpackExecutionProvider",
    "NNAPI": "NnapiExecutionProvider",
    "QNN": "QNNExecutionProvider",
    "CoreML": "CoreMLExecutionProvider",
    "CUDA": "CUDAExecutionProvider",
    "TensorRT": "TensorrtExecutionProvider",
}
# What `--ep` accepts (lower case) -> profile spelling.
EP_ALIASES = {n.lower(): n for n in EXECUTION_PROVIDERS}
EP_ALIASES.update({v.lower(): k for k, v in ORT_NAMES.items()}, trt="TensorRT")

PROVIDER_OPTIONS: dict[str, tuple[str, ...]] = {
    "CPU": (),
    "XNNPACK": ("intra_op_num_threads",),
    "NNAPI": ("use_fp16", "use_nchw", "cpu_disabled", "cpu_only"),
    "QNN": ("backend_type", "backend_path", "htp_performance_mode", "htp_graph_finalization_optimization_mode",
            "soc_model", "htp_arch", "device_id", "enable_htp_fp16_precision", "qnn_context_priority",
            "profiling_level", "profiling_file_path", "rpc_control_latency", "vtcm_mb",
            "offload_graph_io_quantization"),
    "CoreML": ("ModelFormat", "MLComputeUnits", "RequireStaticInputShapes", "EnableOnSubgraphs",
               "SpecializationStrategy", "ProfileComputePlan", "AllowLowPrecisionAccumulationOnGPU",
               "ModelCacheDirectory"),
    "CUDA": ("device_id", "gpu_mem_limit", "arena_extend_strategy", "cudnn_conv_algo_search",
             "do_copy_in_default_stream", "cudnn_conv_use_max_workspace", "enable_cuda_graph",
             "prefer_nhwc", "use_tf32", "tunable_op_enable", "tunable_op_tuning_enable"),
    "TensorRT": ("device_id", "trt_fp16_enable", "trt_int8_enable", "trt_engine_cache_enable",
                 "trt_engine_cache_path", "trt_timing_cache_enable", "trt_timing_cache_path",
                 "trt_max_workspace_size", "trt_builder_optimization_level", "trt_max_partition_iterations",
                 "trt_min_subgraph_size", "trt_dla_enable", "trt_dla_core", "trt_layer_norm_fp32_fallback",
                 "trt_profile_min_shapes", "trt_profile_max_shapes", "trt_profile_opt_shapes",
                 "trt_cuda_graph_enable", "trt_dump_subgraphs", "trt_detailed_build_log"),
}
# Options whose value is one of a few words.
PROVIDER_VALUES: dict[tuple[str, str], tuple[str, ...]] = {
    ("QNN", "backend_type"): ("htp", "cpu", "gpu", "saver"),
    ("QNN", "htp_performance_mode"): (
        "default", "burst", "balanced", "high_performance", "high_power_saver", "low_balanced",
        "low_power_saver", "power_saver", "extreme_power_saver", "sustained_high_performance"),
    ("CoreML", "ModelFormat"): ("MLProgram", "NeuralNetwork"),
    ("CoreML", "MLComputeUnits"): ("CPUOnly", "CPUAndNeuralEngine", "CPUAndGPU", "ALL"),
    ("CoreML", "SpecializationStrategy"): ("Default", "FastPrediction"),
    ("CUDA", "cudnn_conv_algo_search"): ("EXHAUSTIVE", "HEURISTIC", "DEFAULT"),
    ("CUDA", "arena_extend_strategy"): ("kNextPowerOfTwo", "kSameAsRequested"),
}

# NNAPI flag bits (nnapi_provider_factory.h), for runners whose API takes the bit mask.
NNAPI_FLAGS = {"use_fp16": 0x001, "use_nchw": 0x002, "cpu_disabled": 0x004, "cpu_only": 0x008}


def ort_name(ep: str) -> str:
    return ORT_NAMES[ep]


def canonical_ep(name: str) -> str | None:
    """Profile spelling of an EP given in any accepted spelling (cuda, TensorRT, trt, QNNExecutionProvider ...)."""
    return EP_ALIASES.get(str(name).strip().lower())


def unit_of(ep: str, options: dict | None = None) -> str:
    """The compute unit an EP runs its nodes on: cpu, gpu or npu (QNN and CoreML by their options)."""
    opts = options or {}
    if ep in ("CPU", "XNNPACK"):
        return "cpu"
    if ep in ("CUDA", "TensorRT"):
        return "gpu"
    if ep == "QNN":
        return {"cpu": "cpu", "gpu": "gpu"}.get(str(opts.get("backend_type", "htp")), "npu")
    if ep == "CoreML":
        return {"CPUOnly": "cpu", "CPUAndGPU": "gpu"}.get(str(opts.get("MLComputeUnits", "ALL")), "npu")
    return "npu"  # NNAPI: the phone's accelerator (NPU/DSP/GPU, the driver chooses)


# ---------------------------------------------------------------- sessions


def _entry(w) -> tuple[str, dict]:
    """(ORT provider name, options) of one wanted EP: a profile entry, a profile name or an ORT name."""
    if hasattr(w, "ort_options"):  # runtime.profiles.ExecutionProvider
        return w.ort_name, w.ort_options()
    ep = canonical_ep(w)
    if ep is None:
        raise UserError(f"execution provider {w!r} is not known",
                        f"use one of {', '.join(n.lower() for n in ORT_NAMES)}")
    return ORT_NAMES[ep], {}


def provider_plan(wanted=None, strict: bool = False) -> tuple[list[str], list[dict]]:
    """(ORT providers, their options) for a session: the wanted EPs this onnxruntime build has, then CPU.

    strict: an EP this build lacks is a UserError naming the ones it has (no silent CPU fallback);
    otherwise it is dropped with a warning (a profile lists its fallbacks itself).
    """
    import onnxruntime as ort

    have = ort.get_available_providers()
    entries = [_entry(w) for w in (wanted or ["CPU"])]
    missing = [n for n, _ in entries if n not in have]
    if missing and strict:
        raise UserError(f"execution provider {missing[0]} is not available in this onnxruntime build "
                        f"(onnxruntime {ort.__version__} has: {', '.join(have)})",
                        "install the onnxruntime build for it (e.g. onnxruntime-gpu for cuda/tensorrt) or "
                        "choose an available --ep")
    if missing:
        warnings.warn(f"execution providers {missing} are not available in this onnxruntime build "
                      f"(it has {have}); running on the rest of the profile's list", stacklevel=3)
    chosen = [(n, o) for n, o in entries if n in have]
    if "CPUExecutionProvider" not in [n for n, _ in chosen]:
        chosen.append(("CPUExecutionProvider", {}))
    return [n for n, _ in chosen], [o for _, o in chosen]


def parse_ep_options(items: list[str] | None, ep: str) -> dict[str, str]:
    """`--ep-option k=v` list -> options, keys checked against the EP's (runtime.providers)."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--ep-option {item!r} is not KEY=VALUE", "write e.g. --ep-option trt_fp16_enable=1")
        key = key.strip()
        if key not in PROVIDER_OPTIONS[ep]:
            raise UserError(f"--ep-option {key}: not an option of {ep}",
                            f"use one of: {', '.join(PROVIDER_OPTIONS[ep]) or '(none: this EP takes no options)'}")
        values = PROVIDER_VALUES.get((ep, key))
        if values and value not in values:
            raise UserError(f"--ep-option {key}={value}: not a value {ep} takes", f"use one of: {', '.join(values)}")
        out[key] = value
    return out


def ep_session_args(ep: str | None, options: list[str] | None, profile=None) -> tuple[list, list[dict], bool]:
    """(wanted EPs, extra options for the first, strict) from `--ep/--ep-option/--device`."""
    if ep is None:
        if options:
            raise UserError("--ep-option needs --ep", "e.g. --ep tensorrt --ep-option trt_fp16_enable=1")
        return (list(profile.execution_providers) if profile is not None else ["CPU"]), [], False
    name = canonical_ep(ep)
    if name is None:
        raise UserError(f"--ep {ep!r} is not an execution provider",
                        f"use one of: {', '.join(n.lower() for n in ORT_NAMES)}")
    return [name], [parse_ep_options(options, name)], True
