"""Cost model: FLOPs/bytes per node, roofline prediction, calibration on measured variants."""

import numpy as np
import pytest

from _tinyonnx import tiny_encoder
from semedge.runtime import costmodel
from semedge.runtime.profiles import load_profile


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_encoder(tmp_path_factory.mktemp("cm") / "tiny.onnx", d=64, ffn=256, layers=2)


def test_flops_exact(tiny):
    t, d, f, layers = 32, 64, 256, 2
    c = costmodel.analyze(tiny, length=t)
    by = c.by_class()
    assert by["matmul_fp32"]["flops"] == pytest.approx(layers * 2 * t * (d * f + f * d))
    assert by["attention"]["flops"] == pytest.approx(layers * 2 * (2 * t * t * d))
    assert c.weight_bytes == pytest.approx(4 * layers * (d * f + f + f * d + 2 * d), rel=1e-3)
    assert not c.unresolved
    # attention grows quadratically, weights do not change
    c2 = costmodel.analyze(tiny, length=2 * t)
    assert c2.by_class()["attention"]["flops"] == pytest.approx(4 * by["attention"]["flops"])
    assert c2.weight_bytes == c.weight_bytes
    assert c2.peak_activation_bytes > c.peak_activation_bytes


def test_symbolic_length_required(tiny):
    from semedge.core.errors import UserError

    with pytest.raises(UserError, match="length"):
        costmodel.analyze(tiny)


def test_quantized_classes(tiny, tmp_path):
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    import onnx

    q8 = tmp_path / "q8.onnx"
    quantize_dynamic(str(tiny), str(q8), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"])
    c8 = costmodel.analyze(q8, length=16)
    assert c8.by_class()["matmul_int8"]["flops"] == pytest.approx(2 * 2 * 16 * 2 * 64 * 256)
    q = MatMulNBitsQuantizer(onnx.load(str(tiny)), block_size=32, is_symmetric=True)
    q.process()
    q4 = tmp_path / "q4.onnx"
    q.model.save_model_to_file(str(q4))
    c4 = costmodel.analyze(q4, length=16)
    assert c4.by_class()["matmul_int4"]["flops"] == pytest.approx(2 * 2 * 16 * 2 * 64 * 256)
    assert not c4.unresolved
    c32 = costmodel.analyze(tiny, length=16)
    assert c4.weight_bytes < 0.3 * c32.weight_bytes and c8.weight_bytes < 0.4 * c32.weight_bytes
    # MatMulNBits unpacks all K x N weights each run; the other kinds unpack nothing
    assert sum(n.dequant for n in c4.nodes) == pytest.approx(2 * 2 * 64 * 256)
    assert sum(n.dequant for n in c8.nodes) == sum(n.dequant for n in c32.nodes) == 0
    # an uncalibrated profile leaves the added terms out; a fitted one adds time for them
    prof = load_profile("raspberry-pi-5")
    assert "dequant" not in {cls for cls, _ in costmodel.node_times(c4, prof)}
    fitted = prof.model_copy(update={"efficiency": prof.efficiency.model_copy(update={"dequant": 0.05})})
    assert costmodel.predict_latency_ms(c4, fitted) > costmodel.predict_latency_ms(c4, prof)


def test_gather_reads_rows_not_table(tmp_path):
    """An embedding lookup moves the rows it gathers, not the whole (large) table."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    table = numpy_helper.from_array(np.zeros((50000, 64), np.float32), "table")
    g = helper.make_graph([helper.make_node("Gather", ["table", "ids"], ["y"])], "g",
                          [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, "t"])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [table])
    p = tmp_path / "gather.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(p))
    (n,) = [n for n in costmodel.analyze(p, length=32).nodes if n.op_type == "Gather"]
    assert n.bytes == pytest.approx(2 * 32 * 64 * 4 + 32 * 8)
    assert n.weight_bytes == pytest.approx(50000 * 64 * 4)  # the table still counts as weights


def test_nodes_out_of_order_are_costed_in_order(tmp_path):
    """fp16 conversion appends its input Cast last: the graph as written still resolves, in fp16."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.zeros((64, 32), np.float16), "w")
    g = helper.make_graph([helper.make_node("MatMul", ["x16", "w"], ["y16"]), helper.make_node("Relu", ["y16"], ["y"]),
                           helper.make_node("Cast", ["x"], ["x16"], to=TensorProto.FLOAT16)], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 10, 64])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT16, None)], [w])
    p = tmp_path / "unsorted.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(p))
    c = costmodel.analyze(p, as_written=True)
    assert not c.unresolved and [n.op_type for n in c.nodes] == ["Cast", "MatMul", "Relu"]
    (mm,) = [n for n in c.nodes if n.op_type == "MatMul"]
    assert mm.cls == "matmul_fp16" and mm.flops == 2 * 10 * 64 * 32


def test_prediction_scales_with_device(tiny):
    c = costmodel.analyze(tiny, length=64)
    watch = costmodel.predict_latency_ms(c, load_profile("watch"))
    orin = costmodel.predict_latency_ms(c, load_profile("jetson-agx-orin"))
    assert watch > orin > 0
    r = costmodel.predict(tiny, load_profile("watch"), 64)
    assert r["predicted_peak_mb"] > r["weights_mb"] and r["nodes"] > 0


def test_calibration_recovers_factors(tiny):
    """Synthetic 'measurements' from known factors: the fit must recover them (attention and
    conv share matmul_fp32's factor: costmodel.TIED)."""
    prof = load_profile("raspberry-pi-5")
    truth = prof.efficiency.model_copy(update=dict(matmul_fp32=0.3, attention=0.3, conv=0.3, memory=0.4,
                                                   weights=2.0, overhead_us_per_node=20.0, fixed_ms=0.0))
    true_prof = prof.model_copy(update={"efficiency": truth})
    costs = []
    for seed, (d, f) in enumerate([(64, 256), (128, 512), (96, 128)]):
        from pathlib import Path
        import tempfile

        p = tiny_encoder(Path(tempfile.mkdtemp()) / "m.onnx", d=d, ffn=f, layers=2, seed=seed)
        costs += [costmodel.analyze(p, length=t) for t in (8, 64, 256, 512)]
    samples = [(c, costmodel.predict_latency_ms(c, true_prof)) for c in costs]
    eff = costmodel.calibrate(samples, prof)
    fitted = prof.model_copy(update={"efficiency": eff})
    err = [costmodel.predict_latency_ms(c, fitted) / m - 1 for c, m in samples]
    assert max(abs(e) for e in err) < 0.02
    assert eff.weights == pytest.approx(2.0, rel=0.05) and eff.attention == eff.matmul_fp32
    before = [costmodel.predict_latency_ms(c, prof) / m - 1 for c, m in samples]
    assert max(abs(e) for e in before) > 0.2  # the test can fail: defaults are far off


def test_few_samples_fit_one_scale(tiny):
    prof = load_profile("raspberry-pi-5")
    c = costmodel.analyze(tiny, length=64)
    pred = costmodel.predict_latency_ms(c, prof)
    eff = costmodel.calibrate([(c, pred * 2.0)], prof)
    got = costmodel.predict_latency_ms(c, prof.model_copy(update={"efficiency": eff}))
    assert got == pytest.approx(pred * 2.0, rel=0.02)


def test_nnls_nonnegative():
    rng = np.random.default_rng(0)
    a = rng.random((20, 3))
    b = a @ np.array([1.0, 0.0, 2.0]) - 0.3 * a[:, 1]
    x = costmodel._nnls(a, b)
    assert (x >= 0).all() and x[0] > 0.5


# ---------------------------------------------------------------- per-EP partition


def test_partition_int8_on_tensorrt_falls_back_to_cpu(tiny, tmp_path):
    """TensorRT takes no MatMulInteger/DynamicQuantizeLinear: those are costed on the Jetson's CPU."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    q = tmp_path / "q.onnx"
    quantize_dynamic(str(tiny), str(q), weight_type=QuantType.QInt8)
    orin = load_profile("jetson-orin-nano")
    cq, cf = costmodel.analyze(q, 64), costmodel.analyze(tiny, 64)
    rep = costmodel.partition_report(cq, orin)
    assert rep["by_ep"]["CPU"]["ops"]["MatMulInteger"] > 0 and "MatMulInteger" in rep["fallback_ops"]
    assert "TensorRT" in rep["by_ep"] and rep["boundaries"] > 0 and rep["first_ep_flop_share"] < 0.5
    assert costmodel.partition_report(cf, orin)["first_ep_node_share"] == 1.0
    # the int8 graph is predicted slower than fp32 there (CPU fallback + transfers), not faster
    assert costmodel.predict_latency_ms(cq, orin) > costmodel.predict_latency_ms(cf, orin)


def test_partition_mobile_eps_need_fixed_shapes(tiny, tmp_path):
    from _tinyonnx import tiny_encoder

    mid, phone = load_profile("android-mid"), load_profile("iphone")
    dyn = costmodel.partition_report(costmodel.analyze(tiny, 64), mid)
    assert "NNAPI" not in dyn["by_ep"] and set(dyn["fallback_ops"].values()) == {"dynamic shapes"}
    fixed = costmodel.analyze(tiny_encoder(tmp_path / "fx.onnx", d=64, ffn=256, seq=32), None)
    rep = costmodel.partition_report(fixed, mid)
    assert rep["by_ep"]["NNAPI"]["nodes"] > 0 and rep["unmodelled_units"] == ["npu"]  # no published NPU peaks
    assert costmodel.partition_report(fixed, phone)["first_ep_node_share"] > 0.5
    p = costmodel.predict(tiny, load_profile("host"), 64)
    assert p["ep"] == "CPU" and p["partition"]["first_ep_node_share"] == 1.0


def test_formats_for_first_ep():
    assert costmodel.formats_for(load_profile("jetson-orin-nano"))[0] == "fp16"
    assert costmodel.formats_for(load_profile("iphone"))[0] == "fp16"
    assert costmodel.formats_for(load_profile("android-flagship"))[0] == "qdq_a8w8"
    assert costmodel.formats_for(load_profile("android-mid"))[0] == "qdq_a8w8"
    assert "int8_dynamic" in costmodel.formats_for(load_profile("watch"))
    assert costmodel.needs_fixed_shapes(load_profile("android-mid"))
    assert not costmodel.needs_fixed_shapes(load_profile("raspberry-pi-5"))
