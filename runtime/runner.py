"""The device half on the device: ONNX Runtime over a verified package (numpy + onnxruntime only).

    runner = DeviceRunner(Package.load("pkg"), providers=load_profile("jetson-orin-nano"))
    symbols = runner.encode_audio(audio)           # [n_frames, k] float32, the channel input
    symbols = runner.encode_text("hello", k_keep=32)
    msg = layout_message(symbols, package_rate(runner.package, 256, snr_db), snr_db, runner.package.power)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from semedge.core.frames import content_frames, window_frames
from semedge.runtime.features import log_mel, pcm_input, whisper_filters
from semedge.runtime.package import Package
from semedge.runtime.providers import ORT_NAMES, ep_session_args, parse_ep_options, provider_plan  # noqa: F401
from semedge.core.errors import UserError

# Profile names -> ONNX Runtime provider names (runtime.providers owns them).
PROVIDER_NAMES = dict(ORT_NAMES)
# manifest["frontend"]["type"] of the front ends the device computes (written by the speech / text tasks)
LOG_MEL, TOKENIZER, RGB = "whisper-log-mel", "tokenizer", "rgb"
# manifest["frontend"]["compute"] of a log-mel package: "graph" = device.onnx takes PCM (semedge export
# --frontend graph), "numpy" = this runtime computes the log-mel (packages without the key too)
GRAPH, NUMPY = "graph", "numpy"


def normalize_power(x: np.ndarray, k_keep: int | None = None, per: str = "token", eps: float = 1e-8) -> np.ndarray:
    """numpy twin of semcom.jsc.normalize_power: the first k_keep symbols of each token (per="token")
    or of the whole message [..., T, k] (per="message") to unit mean power, rest zero."""
    k = x.shape[-1]
    k_keep = k if k_keep is None else int(k_keep)
    if not 1 <= k_keep <= k:
        raise UserError(f"k_keep={k_keep} is out of range", f"choose 1 <= k_keep <= {k}")
    kept = x[..., :k_keep].astype(np.float32, copy=False)
    axes = (-1,) if per == "token" else (-2, -1)
    kept = kept / np.sqrt(np.mean(np.square(kept), axis=axes, keepdims=True) + np.float32(eps))
    out = np.zeros_like(x, dtype=np.float32)
    out[..., :k_keep] = kept
    return out


def truncate(symbols: np.ndarray, k_keep: int | None, per: str = "token") -> np.ndarray:
    """Rate adaptation: keep the first k_keep symbols per token, renormalised to unit power ([n, k_keep]).
    per="message" always renormalises: the graph scaled over its whole window, the message is the sent frames."""
    if per == "token" and (k_keep is None or k_keep == symbols.shape[-1]):
        return symbols
    return normalize_power(symbols, k_keep, per)[..., :k_keep]


@dataclass(frozen=True)
class LayoutMessage:
    """One message sent with a per-frame layout (semcom/importance.py): what crosses the link."""

    k: np.ndarray  # [T] symbols sent per frame, on the package's ladder
    stream: np.ndarray  # [sum k] float32: x[t, :k_t] of every frame in order, unit mean power
    header: int  # real symbols of the layout header (counted in `symbols`, taken as received without error)

    @property
    def symbols(self) -> int:
        """Real channel symbols: payload + header."""
        return int(self.k.sum()) + self.header


def package_rate(package: Package, budget: int | None, snr_db: float):
    """The importance policy for a nested package (manifest jsc.ladder) at `budget` symbols per frame
    on average, header included; budget None: the package's rate policy at `snr_db` (as --k auto)."""
    from semedge.semcom.importance import ImportanceRate

    lad = package.ladder
    if lad is None:
        raise UserError(f"--k importance needs a nested codec, and package {package.package_id} is not one "
                        "(its manifest has no jsc.ladder)", "export the package from a codec trained with --rate-min "
                        "(e.g. the shipped default), or send a uniform --k N")
    if budget is None:
        from semedge.semcom.rate import RatePolicy

        rp = package.manifest["jsc"].get("rate_policy")
        if not rp:
            raise UserError(f"package {package.package_id} has no rate policy to choose the budget from",
                            f"give it: --k importance:N with N between {lad[0]} and {lad[-1]}")
        budget = RatePolicy.from_dict(rp).choose(snr_db)
    if not lad[0] <= budget <= lad[-1]:
        raise UserError(f"--k importance:{budget}: package {package.package_id} sends {lad[0]} to {lad[-1]} symbols "
                        "per frame", f"give a budget between {lad[0]} and {lad[-1]}")
    return ImportanceRate(lad, int(budget))


def layout_message(code: np.ndarray, rate, snr_db: float, per: str = "message") -> LayoutMessage:
    """One message's code [T, k] (the runner's output at full k) -> its layout and power-normalised
    stream, as semcom.system.send_layout computes them in process."""
    from semedge.semcom.importance import normalize_stream

    lay = rate.layout(code, snr_db)
    stream = normalize_stream(code, lay.k, per).astype(np.float32, copy=False)
    return LayoutMessage(lay.k, stream, lay.header)


def resolve_providers(wanted=None) -> list[str]:
    """ORT providers to use: the wanted ones (profile entries or names, ORT names) this machine has, then CPU."""
    return provider_plan(wanted)[0]


def check_mel_filters(package: Package) -> None:
    """A speech package's filterbank (mel_filters.npy) must be the one `log_mel` computes,
    else the device's features would not be those the model was exported with."""
    rel = package.frontend.get("mel_filters")
    if not rel:  # no log-mel front end
        return
    theirs = np.load(package.file(rel), allow_pickle=False)  # [n_mels, n_fft/2+1]
    ours = whisper_filters().T
    if theirs.shape != ours.shape or not np.allclose(theirs, ours, rtol=0, atol=1e-6):
        raise UserError(f"package {package.package_id}: {rel} {list(theirs.shape)} is not the Whisper "
                        f"log-mel filterbank {list(ours.shape)} this runtime computes",
                        "export the package from a Whisper model with the 80-mel front end")


def frontend_compute(manifest: dict) -> str | None:
    """"graph" or "numpy" for a log-mel package (no key: numpy), None for other front ends."""
    fe = manifest.get("frontend") or {}
    return fe.get("compute", NUMPY) if fe.get("type") == LOG_MEL else None


def check_frontend(manifest: dict, inputs: list[dict], where: str) -> None:
    """Refuse a speech package whose manifest front end and graph input disagree.
    inputs: the graph's [{"name", "shape"}] (manifest onnx.inputs or the session's)."""
    mode = frontend_compute(manifest)
    if mode is None:
        return
    fix = "re-export it: semedge export --frontend graph (PCM input) or --frontend numpy (log-mel input)"
    if mode not in (GRAPH, NUMPY):
        raise UserError(f"{where}: manifest frontend.compute {mode!r} is unknown to this runtime (graph or numpy)", fix)
    name, shape = inputs[0]["name"], list(inputs[0]["shape"])
    if (len(shape) == 2) != (mode == GRAPH):
        feed = "PCM [batch, samples]" if mode == GRAPH else "log-mel [batch, 80, frames]"
        raise UserError(f"{where}: manifest frontend.compute is {mode} (the device feeds {feed}) "
                        f"but device.onnx takes {name} {shape}", fix)


class DeviceRunner:
    """Runs a package's device.onnx: audio, text or an image in, channel symbols [n, k] out."""

    def __init__(self, package: Package | str | Path, providers=None, threads: int | None = None,
                 provider_options: list[dict] | None = None, strict: bool = False):
        """providers: a DeviceProfile (its EPs, options, threads), EP names, or None (CPU).
        provider_options: per wanted EP, options that override the profile's. strict: see provider_plan."""
        import onnxruntime as ort

        if not isinstance(package, Package):
            package = Package.load(package)
        check_mel_filters(package)
        self.package = package
        wanted = providers
        if providers is not None and hasattr(providers, "execution_providers"):  # a DeviceProfile
            wanted = list(providers.execution_providers)
            threads = threads if threads is not None else getattr(providers, "threads", None)
        elif isinstance(providers, str):
            wanted = [providers]
        self.providers, opts_list = provider_plan(wanted, strict)
        for i, extra in enumerate(provider_options or []):
            if i < len(opts_list):
                opts_list[i] = {**opts_list[i], **{k: str(v) for k, v in extra.items()}}
        self.provider_options = opts_list
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = int(threads)
            opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(str(package.onnx_path), sess_options=opts, providers=self.providers,
                                            provider_options=opts_list)
        self.input_names = [i.name for i in self.session.get_inputs()]
        check_frontend(package.manifest, [{"name": i.name, "shape": i.shape} for i in self.session.get_inputs()],
                       f"package {package.package_id}")
        self.output_name = self.session.get_outputs()[0].name
        self._tokenizer = None

    @property
    def k(self) -> int:
        return self.package.k

    @property
    def kind(self) -> str:
        return self.package.kind

    def _run(self, feeds: dict) -> np.ndarray:
        return self.session.run([self.output_name], feeds)[0]

    @property
    def window(self) -> str:
        """"fit" when the graph takes any number of frames (the package's frontend says which), else "full"."""
        dims = self.package.manifest.get("onnx", {}).get("inputs", [{}])[0].get("shape", [])
        fixed = len(dims) >= 2 and isinstance(dims[-1], int)  # [1, 80, 3000] log-mel, [1, 480000] PCM
        return "full" if fixed else self.package.manifest.get("frontend", {}).get("window", "fit")

    def encode_audio(self, audio, k_keep: int | None = None, window: str | None = None) -> np.ndarray:
        """16 kHz mono samples -> symbols [content_frames, k or k_keep] float32; the encoder runs
        on `window` (default: the package's, see runtime.features.window_frames)."""
        if self.package.frontend.get("type") != LOG_MEL:  # the front end the task wrote decides
            raise UserError(f"package {self.package.package_id} is a {self.kind} model, not a speech model",
                            "use encode_text (--text) or encode_image (--image) with this package")
        audio = np.asarray(audio)
        if audio.ndim != 1 or audio.size == 0:
            raise UserError(f"audio has shape {audio.shape}, expected non-empty 1-D samples", "pass mono 16 kHz audio")
        x = self._run({self.input_names[0]: self._features(audio, window or self.window)})[0]
        n = max(1, content_frames(int(audio.shape[0])))
        return truncate(np.ascontiguousarray(x[:n], dtype=np.float32), k_keep, self.package.power)

    def _features(self, audio: np.ndarray, window: str) -> np.ndarray:
        """The graph's input: PCM [1, n] (front end in the graph; "full": padded to 30 s) or log-mel [1, 80, w]."""
        if frontend_compute(self.package.manifest) == GRAPH:
            return pcm_input(audio, full=window == "full")
        w = window_frames(int(audio.shape[0]), window)
        return np.ascontiguousarray(log_mel(audio)[None, :, :w])

    def tokenizer(self):
        if self._tokenizer is None:
            from tokenizers import Tokenizer

            rel = self.package.frontend.get("tokenizer", "tokenizer.json")
            tok = Tokenizer.from_file(str(self.package.file(rel)))
            max_len = self.package.frontend.get("max_length")
            if max_len:
                tok.enable_truncation(int(max_len))
            self._tokenizer = tok
        return self._tokenizer

    def encode_text(self, text: str, k_keep: int | None = None) -> np.ndarray:
        """A sentence -> symbols [tokens, k or k_keep] float32."""
        if self.package.frontend.get("type") != TOKENIZER:
            raise UserError(f"package {self.package.package_id} is a {self.kind} model, not a text model",
                            "use encode_audio (--wav) or encode_image (--image) with this package")
        if not isinstance(text, str) or not text.strip():
            raise UserError("text is empty", "pass a non-empty sentence")
        ids = np.asarray(self.tokenizer().encode(text).ids, dtype=np.int64)[None]
        mask = [n for n in self.input_names if "mask" in n]
        ids_name = next(n for n in self.input_names if n not in mask)
        feeds = {ids_name: ids, **{n: np.ones_like(ids) for n in mask}}
        x = self._run(feeds)[0]
        return truncate(np.ascontiguousarray(x, dtype=np.float32), k_keep, self.package.power)

    def encode_image(self, rgb, k_keep: int | None = None) -> np.ndarray:
        """uint8 RGB [H, W, 3] -> symbols [ceil(H/4) * ceil(W/4), k or k_keep] float32; the image is
        edge-padded to multiples of the package's stride first (the server crops back to H x W)."""
        fe = self.package.frontend
        if fe.get("type") != RGB:
            raise UserError(f"package {self.package.package_id} is a {self.package.kind} model, not an image model",
                            "send an image to an image package (semedge export-image)")
        rgb = np.asarray(rgb)
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8 or 0 in rgb.shape:
            raise UserError(f"image has shape {rgb.shape} and dtype {rgb.dtype}, expected uint8 [H, W, 3]",
                            "pass RGB pixels, e.g. np.asarray(Image.open(path).convert('RGB'))")
        m = int(fe.get("multiple_of", 4))
        padded = np.pad(rgb, ((0, -rgb.shape[0] % m), (0, -rgb.shape[1] % m), (0, 0)), mode="edge")
        x = np.ascontiguousarray(padded.transpose(2, 0, 1)[None], dtype=np.float32) / np.float32(255.0)
        out = self._run({self.input_names[0]: x})[0]
        return truncate(np.ascontiguousarray(out, dtype=np.float32), k_keep, self.package.power)
