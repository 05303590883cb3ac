"""The user's own recordings: a Hugging Face "audiofolder" dataset read into Utterances.

    DIR/metadata.csv        file_name,transcription       (other columns are ignored)
    DIR/clip1.wav           any rate, any channel count: WAV, FLAC, OGG (what soundfile reads)
    DIR/sub/clip2.flac      file_name is relative to DIR

Audio is averaged to mono and resampled to 16 kHz (scipy's polyphase resampler, via
`speech.read_wav`). Every row is checked before anything is returned: each bad row
(missing file, empty transcript, unreadable audio) and a missing column or metadata.csv
is named on its own line in one UserError (exit code 2), so a half-read folder never
reaches a cache.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import re
from pathlib import Path

from semedge.core.errors import UserError
from semedge.semcom.tasks.speech import Utterance, read_wav

METADATA = "metadata.csv"
COLUMNS = ("file_name", "transcription")
SOURCE = "audiofolder"
_FIX = ("each row needs an existing WAV/FLAC/OGG file (file_name, relative to the folder) and a non-empty "
        "transcription; fix or remove the rows named")


def _read_table(meta: Path) -> tuple[list[str], list[tuple[int, dict]]]:
    """(header, [(line number, row)]) of a CSV file; a BOM (Excel) is dropped."""
    try:
        with open(meta, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = [h.strip() for h in (reader.fieldnames or [])]
            reader.fieldnames = header
            rows = [(reader.line_num, row) for row in reader]  # the row's (last) line in the file
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"cannot read {meta}: {e}", "save metadata.csv as UTF-8 CSV with a header row "
                        "file_name,transcription") from None
    return header, rows


def _resolve(folder: Path, name: str) -> Path | None:
    """The file a row names, or None when the name leaves the folder."""
    p = (folder / name).resolve()
    try:
        p.relative_to(folder.resolve())
    except ValueError:
        return None
    return p


def utterance_id(file_name: str, data: bytes) -> str:
    """Stable id: the file name (made safe) and a hash of the file's bytes."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", file_name).strip("._")[-40:] or "audio"
    return f"user-{stem}-{hashlib.sha256(data).hexdigest()[:12]}"


def _make(uid: str, text: str, audio) -> Utterance:
    kw = {"id": uid, "text": text, "audio": audio, "voice": "user", "speed": 0, "source": SOURCE}
    if "family" in {f.name for f in dataclasses.fields(Utterance)}:
        kw["family"] = "user"
    return Utterance(**kw)


def _read_row(folder: Path, row: dict) -> tuple[Utterance | None, list[str]]:
    """One row -> (Utterance or None, problems)."""
    name = (row.get("file_name") or "").strip()
    text = (row.get("transcription") or "").strip()
    problems = []
    if "transcription" in row and not text:
        problems.append("empty transcription")
    if "file_name" not in row:
        return None, problems
    path = _resolve(folder, name) if name else None
    if not name:
        problems.append("empty file_name")
    elif path is None:
        problems.append("file_name leaves the folder")
    elif not path.is_file():
        problems.append("file does not exist")
    else:
        try:
            audio = read_wav(path)
        except UserError as e:
            problems.append(f"unreadable audio ({e.__cause__ or e.problem})")
        else:
            if not problems:
                return _make(utterance_id(name, path.read_bytes()), text, audio), []
    return None, problems


def _header_problems(header: list[str], rows: list) -> list[str]:
    out = []
    missing = [c for c in COLUMNS if c not in header]
    if missing:
        out.append(f"line 1: the header lacks column(s) {', '.join(missing)} (it has: {', '.join(header) or 'nothing'})")
    if not rows:
        out.append("no rows after the header")
    return out


def load_audiofolder(directory) -> list[Utterance]:
    """Every row of DIR/metadata.csv as an Utterance (16 kHz mono float32), in the file's order.

    Raises one UserError naming every bad row (line number, file, problem) when any is bad."""
    folder = Path(directory).expanduser()
    if not folder.is_dir():
        raise UserError(f"data folder {str(folder)!r} does not exist", "give a folder holding metadata.csv and the audio files")
    meta = folder / METADATA
    if not meta.is_file():
        raise UserError(f"{folder} has no {METADATA}",
                        "add metadata.csv with a header row file_name,transcription (Hugging Face audiofolder)")
    header, rows = _read_table(meta)
    problems = _header_problems(header, rows)
    utts = []
    for line, row in rows:
        utt, bad = _read_row(folder, {c: row.get(c) for c in COLUMNS if c in header})
        if bad:
            problems.append(f"line {line}: {(row.get('file_name') or '').strip() or '(no file_name)'}: {'; '.join(bad)}")
        elif utt is not None:
            utts.append(utt)
    if problems:
        raise UserError(f"{len(problems)} problem(s) in {meta}:\n  " + "\n  ".join(problems), _FIX)
    return utts
