"""Clean WER of the built-in Whisper models on the test split, two ways of sending speech:

- padded: the whole 30 s window's 1500 encoder frames are sent (the reference);
- content: only the utterance's frames are sent; the server fills the rest with the
  encoder's output for silence (the default).

Identity JSC, no channel noise. Prints a table, writes benchmarks/results/split_wer.json.
    python benchmarks/split_wer.py [--quick] [--n 100] [--models whisper-base,whisper-tiny.en]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def run(models: list[str], n: int) -> dict:
    from semedge.semcom.metrics import score
    from semedge.semcom.models import load_model
    from semedge.semcom.split import ENC_FRAMES, build_split
    from semedge.semcom.system import run_link
    from semedge.semcom.tasks.speech import load_split

    utts = load_split("test", n)
    audio, refs = [u.audio for u in utts], [u.text for u in utts]
    out = {"n_utterances": n, "split": "test", "models": {}}
    for source in models:
        split = build_split(load_model(source))
        rows = {}
        for frames in ("padded", "content"):
            t0 = time.perf_counter()
            res = run_link(split, audio, channel="none", snr_db=math.inf, frames="all" if frames == "padded" else "content", batch_size=8, progress=True)
            m = score(refs, res.hyps)
            rows[frames] = {
                **m,
                "frames_sent_mean": statistics.mean(res.tokens_sent),
                "frames_sent_share": statistics.mean(res.tokens_sent) / ENC_FRAMES,
                "seconds": time.perf_counter() - t0,
                "examples": [{"ref": r, "hyp": h} for r, h in list(zip(refs, res.hyps))[:5]],
            }
        out["models"][source] = rows
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="20 utterances")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--models", default="whisper-base,whisper-tiny.en")
    a = ap.parse_args()
    n = 20 if a.quick else a.n
    res = run(a.models.split(","), n)
    res["host"] = {"machine": platform.machine(), "python": platform.python_version(), "date": time.strftime("%Y-%m-%d")}
    print(f"\nClean WER on {n} test utterances (identity JSC, no noise)")
    print(f"{'model':18} {'sent':8} {'WER':>6} {'BLEU':>6} {'sim':>6} {'frames':>7} {'share':>6}")
    for src, rows in res["models"].items():
        for frames, r in rows.items():
            print(f"{src:18} {frames:8} {r['wer']:6.3f} {r['bleu']:6.1f} {r['similarity']:6.3f} {r['frames_sent_mean']:7.1f} {r['frames_sent_share']:6.1%}")
    from semedge.core.files import write_atomic

    write_atomic(RESULTS / "split_wer.json", json.dumps(res, indent=2))
    print(f"wrote {RESULTS / 'split_wer.json'}")


if __name__ == "__main__":
    main()
