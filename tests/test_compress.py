"""Compression techniques on tiny random models: shapes shrink, outputs stay finite/close, bad configs fail clearly."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from semedge.compress import distill, prune, quantize_onnx, quantize_torch
from semedge.compress.plan import Plan, Step, apply_onnx_steps, apply_torch_steps, describe
from semedge.core.errors import UserError
from semedge.semcom.models import tiny_model
from semedge.semcom.split import build_split

warnings.filterwarnings("ignore")


@pytest.fixture(scope="module")
def split():
    return build_split(tiny_model("whisper", seed=0))


@pytest.fixture(scope="module")
def feats():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 80, 3000, generator=g) * 0.5


def _export(sp, path, x):
    with torch.no_grad():
        torch.onnx.export(sp.device, (x[:1],), str(path), input_names=["input_features"], output_names=["symbols"],
                          dynamic_axes={"input_features": {0: "batch"}, "symbols": {0: "batch"}}, opset_version=17, dynamo=False)
    return path


def _run(path, x):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), so).run(None, {"input_features": x[:1].numpy()})[0]


@pytest.fixture(scope="module")
def fp32_onnx(split, feats, tmp_path_factory):
    return _export(split, tmp_path_factory.mktemp("onnx") / "fp32.onnx", feats)


# ---------------------------------------------------------------- pruning


def test_prune_removes_weights_and_exports(split, feats, tmp_path):
    sp = prune.apply(split, {"heads": 0.5, "ffn": 0.5, "scope": "layer"}, feats)
    enc = sp.device.encoder
    assert prune.encoder_shapes(sp) == {"heads": [2, 2], "ffn": [64, 64]}
    assert enc.layers[0].self_attn.q_proj.weight.shape == (32, 64)  # 2 heads x 16
    assert enc.layers[0].self_attn.out_proj.weight.shape == (64, 32)
    assert enc.layers[0].fc1.weight.shape == (64, 64) and enc.layers[0].fc2.weight.shape == (64, 64)
    assert prune.encoder_shapes(split) == {"heads": [4, 4], "ffn": [128, 128]}  # input untouched
    with torch.no_grad():
        y = sp.device(feats[:1])
    assert y.shape == (1, 1500, 64) and torch.isfinite(y).all()
    a = _export(split, tmp_path / "a.onnx", feats)
    b = _export(sp, tmp_path / "b.onnx", feats)
    assert b.stat().st_size < 0.85 * a.stat().st_size
    np.testing.assert_allclose(_run(b, feats), y.numpy(), atol=1e-3)
    assert sp.server.transcribe([y[0, :20]], max_new_tokens=3)  # the server still decodes
    assert torch.equal(sp.server.silence, split.server.silence)  # the server's model is unpruned: its silence


def test_dropped_layers_map_back_to_the_teacher(split, feats):
    sp = prune.apply(split, {"drop_layers": [0]}, feats)
    assert sp.device.encoder.config.semedge_teacher_layers == [1]
    st = distill.make_student(sp.device_model.model, distill.DistillConfig(layers=1, warmup=0))
    assert st.get_encoder().config.semedge_teacher_layers == [1]
    assert not hasattr(split.device.encoder.config, "semedge_teacher_layers")  # the input is untouched


def test_prune_global_ranks_across_layers_and_drops_layers(split, feats):
    sp = prune.apply(split, {"heads": 0.5, "ffn": 0.25}, feats)
    shapes = prune.encoder_shapes(sp)
    assert sum(shapes["heads"]) == 4 and all(h >= 1 for h in shapes["heads"])
    assert all(f % 8 == 0 for f in shapes["ffn"])
    sp2 = prune.apply(split, {"drop_layers": [1]}, feats)
    assert len(sp2.device.encoder.layers) == 1 and sp2.device_model.model.config.encoder_layers == 1
    sp3 = prune.apply(split, {"layers": 0.5, "keep_first": True, "keep_last": False}, feats)
    assert len(sp3.device.encoder.layers) == 1


def test_prune_zero_is_identity(split, feats):
    sp = prune.apply(split, {}, feats)
    with torch.no_grad():
        assert torch.equal(sp.device(feats[:1]), split.device(feats[:1]))


def test_prune_text_encoder():
    loaded = tiny_model("bart")
    enc = loaded.tokenizer(["a small test sentence", "another one"], return_tensors="pt", padding=True)
    m = prune.apply(loaded.model, {"heads": 0.25, "ffn": 0.5, "scope": "layer"}, dict(enc))
    assert prune.encoder_shapes(m) == {"heads": [3, 3], "ffn": [64, 64]}
    with torch.no_grad():
        h = m.get_encoder()(**enc).last_hidden_state
    assert torch.isfinite(h).all()


def test_shape_encoder_rebuilds_pruned_layout(split, feats):
    sp = prune.apply(split, {"heads": 0.5, "ffn": 0.5}, feats)
    import copy

    fresh = copy.deepcopy(split.loaded.model)
    prune.shape_encoder(fresh, prune.encoder_shapes(sp))
    fresh.get_encoder().load_state_dict(sp.device_model.model.get_encoder().state_dict())


@pytest.mark.parametrize("cfg,field", [
    ({"heads": 1.5}, "heads"), ({"ffn": -0.1}, "ffn"), ({"heads": 1.0}, "heads"), ({"scope": "model"}, "scope"),
    ({"head": 0.2}, "head"), ({"layers": 0.5, "drop_layers": [1]}, "drop_layers"), ({"min_heads": 0}, "min_heads"),
])
def test_prune_bad_config(cfg, field):
    with pytest.raises(UserError) as e:
        prune.PruneConfig.from_dict(cfg)
    assert field in str(e.value)


def test_prune_unknown_layer(split, feats):
    with pytest.raises(UserError, match="drop_layers.*0..1"):
        prune.apply(split, {"drop_layers": [5]}, feats)
    with pytest.raises(UserError, match="calibration"):
        prune.apply(split, {"heads": 0.25}, None)


# ---------------------------------------------------------------- ONNX quantization


def _ops(path):
    import onnx

    return {n.op_type for n in onnx.load(str(path)).graph.node}


def test_int8_dynamic_smaller_and_close(fp32_onnx, feats, tmp_path):
    out = quantize_onnx.apply(fp32_onnx, tmp_path / "q.onnx", {"mode": "int8_dynamic", "other_weights": "int8"})
    assert out.stat().st_size < 0.5 * fp32_onnx.stat().st_size
    assert "MatMulInteger" in _ops(out) or "DynamicQuantizeMatMul" in _ops(out)
    ref, got = _run(fp32_onnx, feats), _run(out, feats)
    assert np.isfinite(got).all()
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 0.2


def test_int4_and_mixed_precision_filter(fp32_onnx, feats, tmp_path):
    import onnx

    full = quantize_onnx.apply(fp32_onnx, tmp_path / "q4.onnx", {"mode": "int4", "block_size": 32})
    mixed = quantize_onnx.apply(fp32_onnx, tmp_path / "q4m.onnx", {"mode": "int4", "block_size": 32, "keep_fp32": ["first_last"]})
    n_full = quantize_onnx.quantized_nodes(full).get("MatMulNBits", 0)
    n_mixed = quantize_onnx.quantized_nodes(mixed).get("MatMulNBits", 0)
    assert n_full == 12 and n_mixed == 0  # tiny model: 2 layers x 6 weight MatMuls, both layers kept fp32
    one = quantize_onnx.apply(fp32_onnx, tmp_path / "q4l0.onnx", {"mode": "int4", "block_size": 32, "keep_fp32": [r"layers\.0[./]"]})
    m = onnx.load(str(one))
    kept = [n.name for n in m.graph.node if n.op_type == "MatMul" and "layers.0/" in n.name and "proj" in n.name]
    assert len(kept) == 4 and quantize_onnx.quantized_nodes(m)["MatMulNBits"] == 6
    assert np.isfinite(_run(full, feats)).all()
    assert full.stat().st_size < fp32_onnx.stat().st_size


def test_fp16_and_static_qdq(fp32_onnx, feats, tmp_path):
    f16 = quantize_onnx.apply(fp32_onnx, tmp_path / "h.onnx", {"mode": "fp16"})
    ref = _run(fp32_onnx, feats)
    np.testing.assert_allclose(_run(f16, feats), ref, atol=0.05 * np.abs(ref).max())
    qdq = quantize_onnx.apply(fp32_onnx, tmp_path / "s.onnx", {"mode": "int8_static", "calib_size": 2, "op_types": ["MatMul"]},
                              calib=feats.numpy())
    assert {"QuantizeLinear", "DequantizeLinear"} <= _ops(qdq)
    assert np.isfinite(_run(qdq, feats)).all()
    # A16W8: 16-bit activations track the float graph more closely than 8-bit ones
    a8 = quantize_onnx.apply(fp32_onnx, tmp_path / "a8.onnx", {"mode": "int8_static", "calib_size": 2}, calib=feats.numpy())
    a16 = quantize_onnx.apply(fp32_onnx, tmp_path / "a16.onnx", {"mode": "int8_static", "calib_size": 2, "activations": "uint16"},
                              calib=feats.numpy())
    import onnx

    types = {init.data_type for init in onnx.load(str(a16)).graph.initializer if init.name.endswith("_zero_point")}
    assert onnx.TensorProto.UINT16 in types
    err = lambda p: np.linalg.norm(_run(p, feats) - ref) / np.linalg.norm(ref)
    assert err(a16) < err(a8)
    with pytest.raises(UserError, match="calibration"):
        quantize_onnx.apply(fp32_onnx, tmp_path / "s2.onnx", {"mode": "int8_static"})


@pytest.mark.parametrize("cfg,field", [
    ({"mode": "int3"}, "mode"), ({"block_size": 100}, "block_size"), ({"keep_fp32": "jsc"}, "keep_fp32"),
    ({"keep_fp32": ["("]}, "keep_fp32"), ({"other_weights": "int2"}, "other_weights"),
    ({"activations": "int4"}, "activations"),
])
def test_onnx_bad_config(cfg, field):
    with pytest.raises(UserError) as e:
        quantize_onnx.OnnxQuantConfig.from_dict(cfg)
    assert field in str(e.value)


# ---------------------------------------------------------------- server half


@pytest.mark.parametrize("mode,cls", [("torch_int8", "Linear"), ("bnb_int8", "Linear8bitLt"), ("bnb_nf4", "Linear4bit")])
def test_server_quantization(split, mode, cls):
    y = [torch.randn(30, 64, generator=torch.Generator().manual_seed(0))]
    h, _ = split.server.encoder_states(y)
    ids = torch.tensor([[split.loaded.model.config.decoder_start_token_id, 100, 200]])
    with torch.no_grad():
        ref = split.loaded.model(encoder_outputs=(h,), decoder_input_ids=ids).logits
    sq = quantize_torch.apply(split, {"mode": mode})
    fc1 = sq.loaded.model.model.decoder.layers[0].fc1
    assert type(fc1).__name__ == cls and "ao.nn" in type(fc1).__module__ if mode == "torch_int8" else type(fc1).__name__ == cls
    assert type(split.loaded.model.model.decoder.layers[0].fc1) is torch.nn.Linear  # original untouched
    assert sq.device is split.device
    with torch.no_grad():
        got = sq.loaded.model(encoder_outputs=(h,), decoder_input_ids=ids).logits
    assert torch.isfinite(got).all()
    assert (got - ref).abs().max() < 0.5 * ref.abs().max()
    assert quantize_torch.decoder_bytes(sq.loaded.model) < quantize_torch.decoder_bytes(split.loaded.model)
    assert len(sq.server.transcribe(y, max_new_tokens=3)) == 1


def test_server_bad_config():
    with pytest.raises(UserError, match="mode"):
        quantize_torch.ServerQuantConfig.from_dict({"mode": "int2"})


# ---------------------------------------------------------------- distillation


def test_distill_student_trains_and_resumes(split, feats, tmp_path):
    cfg = {"layers": 1, "steps": 2, "warmup": 0, "save_every": 1, "max_tokens": 4, "lr": 1e-3}
    cal = {"features": feats, "n_frames": [100, 300]}
    s1 = distill.apply(split, cfg, cal, progress=False, workdir=tmp_path)
    assert len(s1.device.encoder.layers) == 1 and len(s1.distill_losses) == 2
    assert all(np.isfinite(s1.distill_losses))
    assert {p.name for p in tmp_path.iterdir()} == {"student.safetensors", "optim.safetensors", "state.json"}
    assert json.loads((tmp_path / "state.json").read_text())["step"] == 2
    s2 = distill.apply(split, cfg, cal, progress=False, workdir=tmp_path)  # resumes at step 2: nothing to train
    assert s2.distill_losses == s1.distill_losses
    assert torch.equal(s2.device.encoder.layers[0].fc1.weight, s1.device.encoder.layers[0].fc1.weight)
    with pytest.raises(UserError, match="different config"):
        distill.apply(split, dict(cfg, lr=1e-2), cal, progress=False, workdir=tmp_path)
    with torch.no_grad():
        assert torch.isfinite(s1.device(feats[:1])).all()
    saved = distill.save_student(s1, tmp_path / "enc.safetensors")
    assert saved.stat().st_size > 0


def test_prune_then_distill_learns_from_the_unpruned_teacher(split, feats, monkeypatch):
    from semedge.compress.plan import Plan, apply_torch_steps

    seen = {}
    real = distill.train

    def spy(teacher, student, cfg, calib, **kw):
        seen["teacher_ffn"] = teacher.loaded.model.get_encoder().layers[0].fc1.out_features
        seen["student_ffn"] = student.get_encoder().layers[0].fc1.out_features
        return real(teacher, student, cfg, calib, **kw)

    monkeypatch.setattr(distill, "train", spy)
    plan = Plan.make([{"op": "prune", "config": {"ffn": 0.5}},
                      {"op": "distill", "config": {"layers": 2, "steps": 2, "warmup": 0, "max_tokens": 4}}])
    out = apply_torch_steps(split, plan, {"features": feats, "n_frames": [100, 300]})
    full = split.loaded.model.get_encoder().layers[0].fc1.out_features
    assert seen["teacher_ffn"] == full and seen["student_ffn"] < full  # pruned student, unpruned teacher
    assert out.device.encoder.layers[0].fc1.out_features == seen["student_ffn"] and len(out.distill_losses) == 2
    assert torch.equal(out.server.silence, split.server.silence)


def test_distill_fitted_windows_make_short_targets(split, feats):
    t = distill.teacher_targets(split, feats, 4, n_frames=[100, 300])
    assert [x.shape[0] for x in t["target"]] == [120, 320]  # content frames + 20 (FIT_MARGIN / 2)


def test_distill_layer_matching_lowers_the_hidden_loss(split, feats):
    """hidden_weight matches each student layer to the teacher layer it came from; the
    normalised losses fall over a few steps at a warm-up + cosine learning rate."""
    cal = {"features": feats, "n_frames": [100, 300]}
    t = distill.teacher_targets(split, feats, 4, n_frames=[100, 300], hidden=True)
    assert [h.shape for h in t["hidden"]] == [(2, 120, 64), (2, 320, 64)]  # [teacher layers, frames, d]
    cfg = distill.DistillConfig(layers=1, init_layers=(0,), steps=12, lr=3e-3, warmup=2, kl_weight=0.0, hidden_weight=1.0,
                                feature_norm=True, max_tokens=4)
    student = distill.make_student(split.loaded.model, cfg)
    assert student.get_encoder().config.semedge_teacher_layers == [0]
    losses = distill.train(split, student, cfg, cal, progress=False, targets=t)
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    assert [round(distill.lr_factor(i, cfg), 3) for i in (0, 1, 2, 11)] == [0.5, 1.0, 1.0, round(0.5 * (1 + np.cos(np.pi * 9 / 10)), 3)]


def test_distill_bad_config(split):
    with pytest.raises(UserError, match="layers"):
        distill.DistillConfig.from_dict({"layers": 0})
    with pytest.raises(UserError, match="warmup"):
        distill.DistillConfig.from_dict({"steps": 10, "warmup": 10})
    with pytest.raises(UserError, match="feature_norm"):
        distill.DistillConfig.from_dict({"feature_norm": "yes"})
    with pytest.raises(UserError, match="init_layers"):
        distill.student_layers(2, distill.DistillConfig(layers=1, init_layers=(3,)))


# ---------------------------------------------------------------- plans


def test_plan_round_trip_and_hash(tmp_path):
    p = Plan.make([{"op": "prune", "config": {"heads": 0.25, "ffn": 0.25}},
                   {"op": "distill", "config": {"layers": 4, "steps": 10, "warmup": 0}},
                   {"op": "quantize_onnx", "config": {"mode": "int4", "keep_fp32": ["critical"]}},
                   {"op": "quantize_server", "config": {"mode": "bnb_nf4"}}], name="edge")
    p.to_json(tmp_path / "plan.json")
    q = Plan.from_json(tmp_path / "plan.json")
    assert q == p and q.hash() == p.hash() and q.to_json() == p.to_json()
    assert Plan.from_json(p.to_json()) == p
    assert describe(p).startswith("prune(h=0.25,f=0.25) → distill(L=4")
    assert describe(Plan.make([{"op": "quantize_onnx", "config": {"mode": "int8_dynamic"}}])) == "int8"
    assert Plan.make([], "other").hash() != p.hash()


@pytest.mark.parametrize("steps,msg", [
    ([{"op": "shrink"}], "step 0.*shrink"),
    ([{"op": "prune", "config": {"heads": 2}}], "step 0.*heads"),
    ([{"op": "prune", "config": {}}, {"op": "quantize_onnx", "config": {"mode": "int9"}}], "step 1.*mode"),
    ([{"op": "quantize_onnx"}, {"op": "prune"}], "step 1"),
    ([{"op": "prune", "cfg": {}}], "step 0.*cfg"),
])
def test_plan_errors_name_the_step(steps, msg):
    with pytest.raises(UserError, match=msg):
        Plan.make(steps)


def test_plan_apply_twice_same_bytes(split, feats, tmp_path):
    p = Plan.make([{"op": "prune", "config": {"heads": 0.25, "ffn": 0.25}},
                   {"op": "quantize_onnx", "config": {"mode": "int8_dynamic"}}])
    outs = []
    for i in range(2):
        sp = apply_torch_steps(split, p, feats)
        raw = _export(sp, tmp_path / f"raw{i}.onnx", feats)
        outs.append(apply_onnx_steps(raw, tmp_path / f"q{i}.onnx", p).read_bytes())
    assert outs[0] == outs[1]
    assert isinstance(p.steps[0], Step)


# ---------------------------------------------------------------- registries and the realise step


def test_mode_registries_map_names_to_classes():
    assert set(quantize_onnx.MODES) == {"int8_dynamic", "int8_static", "fp16", "int4"}
    m = quantize_onnx.OnnxQuantConfig(mode="int4", block_size=32, per_channel=False).mode_config()
    assert isinstance(m, quantize_onnx.Int4) and m.block_size == 32 and not hasattr(m, "per_channel")
    assert set(quantize_torch.MODES) == {"torch_int8", "bnb_int8", "bnb_nf4"}
    assert quantize_torch.ServerQuantConfig(mode="bnb_nf4", blocksize=128).mode_config() == quantize_torch.BnbNf4(blocksize=128)
    from semedge.compress.plan import STEPS

    assert STEPS["quantize_onnx"].config_class() is quantize_onnx.OnnxQuantConfig
    assert {op: k.runs for op, k in STEPS.items()} == {"prune": "torch", "distill": "torch", "student": "torch",
                                                       "quantize_onnx": "onnx", "quantize_server": "server"}


def test_keep_fp32_is_a_node_filter(fp32_onnx):
    import onnx

    m = onnx.load(str(fp32_onnx))
    keep = quantize_onnx.keep_fp32_filter(m, [r"layers\.0[./]"])
    kept = [n.name for n in m.graph.node if not keep(n, n.name)]
    assert kept and all("layers.0" in n.name or any("layers.0" in i for i in n.input)
                        for n in m.graph.node if n.name in kept)
    assert all(quantize_onnx.keep_fp32_filter(m, [])(n, n.name) for n in m.graph.node)


def test_quantize_torch_filter_over_module_and_name():
    net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    n = quantize_torch.quantize_(net, quantize_torch.TorchInt8(), quantize_torch.skip_filter([r"^2$"]))
    assert n == 1 and type(net[0]) is not torch.nn.Linear and type(net[2]) is torch.nn.Linear


def test_several_onnx_steps_run_in_order(fp32_onnx, tmp_path):
    first = {"mode": "int4", "block_size": 32, "keep_fp32": [r"layers\.0[./]"]}
    p = Plan.make([{"op": "quantize_onnx", "config": first}, {"op": "quantize_onnx", "config": {"mode": "int4", "block_size": 32}}])
    assert describe(p) == r"int4(b=32)+fp32[layers\.0[./]] → int4(b=32)"
    two = apply_onnx_steps(fp32_onnx, tmp_path / "two.onnx", p)
    step1 = quantize_onnx.apply(fp32_onnx, tmp_path / "s1.onnx", first)
    by_hand = quantize_onnx.apply(step1, tmp_path / "s2.onnx", {"mode": "int4", "block_size": 32})
    assert two.read_bytes() == by_hand.read_bytes()
    everywhere = quantize_onnx.apply(fp32_onnx, tmp_path / "all.onnx", {"mode": "int4", "block_size": 32})
    n = quantize_onnx.quantized_nodes
    assert n(step1)["MatMulNBits"] < n(two)["MatMulNBits"] == n(everywhere)["MatMulNBits"]


def test_realise_builds_once_and_caches(split, feats, tmp_path):
    from semedge.compress.realise import RealiseFiles, realise

    p = Plan.make([{"op": "quantize_onnx", "config": {"mode": "int8_dynamic"}}])
    files = RealiseFiles(tmp_path / "q.onnx", tmp_path / "base.fp32.onnx")
    calls = []

    def torch_split():
        calls.append(1)
        return split

    r = realise(p, torch_split, files, optimize=True)
    assert r.built and r.path.is_file() and r.bytes == r.path.stat().st_size and calls == [1]
    assert json.loads(files.onnx.with_suffix(".json").read_text())["plan"] == p.to_dict()
    again = realise(p, torch_split, files)
    assert not again.built and again.optimized == r.optimized and calls == [1]
    # another plan on the same export: the fp32 file is reused, not exported again
    other = realise(Plan.make([]), torch_split, RealiseFiles(tmp_path / "fp32.onnx", files.base))
    assert other.built and calls == [1] and other.path.read_bytes() == files.base.read_bytes()


def test_planner_keeps_one_pruned_copy_whose_decoder_is_the_originals(split, feats, tmp_path):
    """Issue 20 (planner memory): a pruned candidate copies only the encoder (the decoder's tensors are
    the original's), and the workspace lets the previous pruned copy go when it makes the next one."""
    import gc
    import weakref

    from semedge.compress.workspace import Workspace

    ws = Workspace(split.loaded, split, tmp_path, feats)
    a = ws.torch_split(Plan.make([{"op": "prune", "config": {"heads": 0.5}}], "a"))
    orig, pruned = split.loaded.model.model, a.device_model.model.model
    assert all(p is q for p, q in zip(pruned.decoder.parameters(), orig.decoder.parameters()))
    assert not {p.data_ptr() for p in orig.encoder.parameters()} & {p.data_ptr() for p in pruned.encoder.parameters()}
    gone = weakref.ref(a.device_model.model)
    del a, pruned
    ws.torch_split(Plan.make([{"op": "prune", "config": {"ffn": 0.5}}], "b"))
    gc.collect()
    assert gone() is None


def test_percentile_calibration_takes_windows_of_different_lengths(tmp_path):
    """ORT's histogram calibrators stack activations; ragged windows are cropped to a common shape."""
    import onnx
    from onnx import TensorProto, helper

    w = helper.make_tensor("w", TensorProto.FLOAT, [80, 16], np.random.default_rng(0).normal(size=(80, 16)).astype(np.float32).ravel())
    g = helper.make_graph([helper.make_node("Transpose", ["input_features"], ["xt"], perm=[0, 2, 1]), helper.make_node("MatMul", ["xt", "w"], ["y"])],
                          "g", [helper.make_tensor_value_info("input_features", TensorProto.FLOAT, [1, 80, "T"])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "T", 16])], [w])
    src = tmp_path / "dyn.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(src))
    rng = np.random.default_rng(1)
    calib = [rng.normal(size=(80, t)).astype(np.float32) for t in (40, 64, 52)]
    assert [c.shape for c in quantize_onnx.common_shape(calib)] == [(80, 40)] * 3
    out = quantize_onnx.apply(src, tmp_path / "p.onnx", {"mode": "int8_static", "calibrate": "percentile", "calib_size": 3}, calib=calib)
    assert {"QuantizeLinear", "DequantizeLinear"} <= _ops(out)
    assert np.isfinite(_run(out, torch.from_numpy(calib[1][None]))).all()
