"""Speech task data: English sentences spoken by espeak-ng, deterministic splits, cached audio.

Sentences come from files installed on the machine (no download): WordNet gloss
examples (Debian wordnet-base), fortunes-min, and Python's `pydoc_data.topics`.
Each cleaned sentence lands in test/val/train by a hash of its normalised text,
so the splits are disjoint and stable; within a split the order is a seeded,
hash-based shuffle, so `load_split("test", n=50)` always returns the same 50.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import tempfile
import time
import wave
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from semedge.semcom.errors import UserError
from semedge.semcom.metrics import normalize

SAMPLE_RATE = 16000
ESPEAK_RATE = 22050
SPLITS = ("train", "val", "test")
# Hash buckets out of 100: [0, 10) test, [10, 20) val, the rest train.
_TEST_PCT, _VAL_PCT = 10, 10
_ORDER_SEED = "semedge-speech-v1"
# Voices checked with `espeak-ng --voices=en` / `--voices=variant` (mbrola voices need extra packages).
VOICES = ("en-us", "en-gb", "en-gb-x-rp", "en-us+m3", "en-us+f3", "en-gb-scotland")
SPEEDS = (140, 150, 160, 170, 180)  # words per minute
CACHE_FORMAT = 1

WORDNET_DIR = Path("/usr/share/wordnet")
FORTUNES_DIR = Path("/usr/share/games/fortunes")
MIN_WORDS, MAX_WORDS = 4, 20


@dataclass
class Utterance:
    id: str
    text: str
    audio: np.ndarray = field(repr=False)  # float32, 16 kHz mono
    voice: str
    speed: int
    source: str

    @property
    def duration(self) -> float:
        return len(self.audio) / SAMPLE_RATE


# ---------------------------------------------------------------- sentences

_BAD_CHARS = re.compile(r"[^A-Za-z ,.;:!?'\-]")  # digits, quotes, brackets, symbols: not spoken cleanly
_CODE_LIKE = re.compile(r"\w\.\w|\w\(|::|--|\.\.|\b[a-z]+[A-Z]\w*|\b[A-Z]{2,}\b")


def clean_sentence(text: str) -> str | None:
    """One readable English sentence of 4-20 words, or None."""
    t = re.sub(r"\s+", " ", text).strip()
    if not t or not t.isascii() or _BAD_CHARS.search(t) or _CODE_LIKE.search(t):
        return None
    if not t[0].isalpha():
        return None
    # One sentence: no terminator except at the end.
    if re.search(r"[.!?;:]\s", t):
        return None
    words = t.split()
    if not (MIN_WORDS <= len(words) <= MAX_WORDS):
        return None
    if sum(c.isalpha() for c in t) < 0.75 * len(t.replace(" ", "")):
        return None
    return t


def _wordnet_examples() -> list[str]:
    out = []
    for pos in ("noun", "verb", "adj", "adv"):
        p = WORDNET_DIR / f"data.{pos}"
        if not p.exists():
            continue
        with open(p, encoding="latin-1") as f:
            for line in f:
                if line.startswith(" ") or "|" not in line:
                    continue  # licence header
                gloss = line.split("|", 1)[1]
                out.extend(re.findall(r'"([^"]+)"', gloss))
    return out


def _strip_overstrike(s: str) -> str:
    # fortune files bold/underline text with "x\bx" and "_\bx".
    while "\b" in s:
        s2 = re.sub(r".\x08", "", s)
        if s2 == s:
            s2 = s.replace("\b", "")
        s = s2
    return s


def _fortunes() -> list[str]:
    out = []
    if not FORTUNES_DIR.is_dir():
        return out
    for p in sorted(FORTUNES_DIR.iterdir()):
        if p.suffix or p.is_symlink() or not p.is_file():
            continue  # skip .dat indexes and .u8 links
        text = _strip_overstrike(p.read_text(encoding="latin-1"))
        for entry in re.split(r"^%\s*$", text, flags=re.M):
            if "\n\t" in entry or "\n  " in entry:
                continue  # verse, dialogue, attributions
            out.append(entry)
    return out


def _pydoc() -> list[str]:
    try:
        from pydoc_data.topics import topics
    except ImportError:
        return []
    out = []
    for key in sorted(topics):
        # Paragraphs of flush-left prose; indented blocks are grammar or code.
        for para in re.split(r"\n\s*\n", topics[key]):
            lines = para.split("\n")
            if any(ln.startswith(" ") for ln in lines) or re.match(r"^[*=\-]+$", lines[-1].strip()):
                continue
            prose = " ".join(ln.strip() for ln in lines)
            # Lowercase starts are fragments left after a code block.
            out.extend(t for t in re.split(r"(?<=[.!?])\s+(?=[A-Z])", prose) if t[:1].isupper())
    return out


_SOURCES = {"wordnet": _wordnet_examples, "fortunes": _fortunes, "pydoc": _pydoc}


def _hash(s: str, salt: str = "") -> int:
    return int.from_bytes(hashlib.sha1((salt + s).encode()).digest()[:8], "big")


def split_of(sentence: str) -> str:
    """The split a sentence belongs to (hash of its normalised text)."""
    b = _hash(normalize(sentence)) % 100
    return "test" if b < _TEST_PCT else "val" if b < _TEST_PCT + _VAL_PCT else "train"


@functools.lru_cache(maxsize=1)
def _corpus() -> dict[str, list[tuple[str, str]]]:
    """split -> [(sentence, source)] in the split's fixed order."""
    seen: set[str] = set()
    by_split: dict[str, list[tuple[str, str]]] = {s: [] for s in SPLITS}
    for source, fn in _SOURCES.items():
        for raw in fn():
            s = clean_sentence(raw)
            if s is None:
                continue
            key = normalize(s)
            if key in seen:
                continue
            seen.add(key)
            by_split[split_of(s)].append((s, source))
    for items in by_split.values():
        items.sort(key=lambda it: (_hash(normalize(it[0]), _ORDER_SEED), it[0]))
    return by_split


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}", f"use one of {', '.join(SPLITS)}")
    return split


def sentences(split: str) -> list[str]:
    """All sentences of a split, in its fixed order."""
    return [s for s, _ in _corpus()[_check_split(split)]]


def split_sizes() -> dict[str, int]:
    return {s: len(_corpus()[s]) for s in SPLITS}


def voice_for(text: str) -> tuple[str, int]:
    """Deterministic (voice, speed) for a sentence."""
    h = _hash(normalize(text), "voice")
    return VOICES[h % len(VOICES)], SPEEDS[(h // len(VOICES)) % len(SPEEDS)]


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
    if not isinstance(text, str) or not text.strip():
        raise UserError("text to synthesize is empty", "pass a non-empty sentence")
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
        with wave.open(wav, "rb") as w:
            sr, ch, width = w.getframerate(), w.getnchannels(), w.getsampwidth()
            raw = w.readframes(w.getnframes())
    if width != 2:
        raise UserError(f"espeak-ng wrote {8 * width}-bit audio, expected 16-bit", "use espeak-ng >= 1.49")
    x = np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0
    if ch > 1:
        x = x.reshape(-1, ch).mean(axis=1)
    return _resample(x, sr)


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
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


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


def utterance_id(split: str, text: str) -> str:
    return f"{split}-{hashlib.sha1(normalize(text).encode()).hexdigest()[:12]}"


def load_split(split: str, n: int | None = None, progress: bool = True) -> list[Utterance]:
    """The first `n` utterances of a split (all when None), synthesizing and caching missing audio."""
    items = _corpus()[_check_split(split)]
    if n is not None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise UserError(f"n must be a non-negative int, got {n!r}", "pass e.g. n=50, or None for all")
        items = items[:n]
    d = cache_dir(split)
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create cache folder {str(d)!r}: {e}", "set XDG_CACHE_HOME to a writable folder") from e
    index = _read_index(d)["utterances"]

    out: list[Utterance | None] = [None] * len(items)
    todo = []
    for i, (text, source) in enumerate(items):
        uid = utterance_id(split, text)
        voice, speed = voice_for(text)
        meta = index.get(uid)
        f = d / f"{uid}.npy"
        if meta and meta.get("text") == text and meta.get("voice") == voice and meta.get("speed") == speed:
            try:
                a = np.load(f, allow_pickle=False)
                if a.dtype == np.int16 and a.ndim == 1 and len(a) == meta.get("samples"):
                    out[i] = Utterance(uid, text, _from_int16(a), voice, speed, source)
                    continue
            except (OSError, ValueError):
                pass
        todo.append((i, uid, text, source, voice, speed))

    if todo:
        bar = None
        if progress and len(todo) > 20:
            from tqdm import tqdm

            bar = tqdm(total=len(todo), desc=f"synthesizing {split}", unit="utt")
        new = {}
        for i, uid, text, source, voice, speed in todo:
            t0 = time.perf_counter()
            a16 = _to_int16(synthesize(text, voice, speed))
            _atomic_write(d / f"{uid}.npy", lambda fh, a=a16: np.save(fh, a, allow_pickle=False))
            new[uid] = {"text": text, "voice": voice, "speed": speed, "source": source,
                        "samples": int(len(a16)), "synth_s": round(time.perf_counter() - t0, 4)}
            out[i] = Utterance(uid, text, _from_int16(a16), voice, speed, source)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        with _locked(d):
            idx = _read_index(d)  # re-read: another process may have added entries
            idx["utterances"].update(new)
            body = json.dumps(idx, indent=1, sort_keys=True).encode()
            _atomic_write(d / "index.json", lambda fh: fh.write(body))
    return out  # type: ignore[return-value]
