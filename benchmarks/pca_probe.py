"""Where does the codec's gap on Piper come from? Unsplit whisper-base vs untrained PCA-k codes
(fit on 200 training utterances of the voices mix), with the JSC's power normalisation per token,
per message, or none, on 200 Piper test sentences, clean channel, loop cut. Results are merged
into benchmarks/results/pca_probe_piper.json.

    python benchmarks/pca_probe.py [K ...] [--modes token,message,plain]
"""
import argparse
import math, json, sys
import torch
from torch import nn
sys.path.insert(0, "benchmarks")
from voices import identity_codec
from semedge.semcom.models import load_model
from semedge.semcom.training.data import speech_examples
from semedge.semcom.training.evaluate import transmit_examples
from semedge.semcom.metrics import word_errors_per_utt
from semedge.semcom import stats
from semedge.semcom.jsc import JSCCodec, JSCConfig, init_pca
torch.set_num_threads(1)
base = load_model("whisper-base")
tr = speech_examples(base, "train", 200, family="mix", progress=False)
H = torch.cat([e.h.float() for e in tr])
test = speech_examples(base, "test", 200, family="piper", progress=False)
refs = [e.text for e in test]

class Plain(nn.Module):  # linear PCA code, no power normalisation
    def __init__(s, c):
        super().__init__(); s.c = c; s.cfg = c.cfg
        s.encoder = s; s.decoder = s._Dec(c)
    def forward(s, h, k_keep=None):
        return (h - s.c.encoder.mean) / s.c.encoder.std @ s.c.encoder.proj.weight.T
    class _Dec(nn.Module):
        def __init__(s, c): super().__init__(); s.c = c; s.cfg = c.cfg
        def forward(s, y):
            v = s.c.encoder.proj.weight  # [k, d]
            return (y @ v) * s.c.decoder.std + s.c.decoder.mean

ap = argparse.ArgumentParser()
ap.add_argument("k", nargs="*", type=int, default=[192, 256, 384])
ap.add_argument("--modes", default="token,plain")
args = ap.parse_args()
path = "benchmarks/results/pca_probe_piper.json"
try:
    out = json.load(open(path))
except FileNotFoundError:
    out = {}
if "unsplit" not in out:
    hyps, _ = transmit_examples(base, identity_codec(base), test, "none", math.inf, backend="ct2")
    out["unsplit"] = stats.wer_ci(word_errors_per_utt(refs, hyps)); print("unsplit", out["unsplit"], flush=True)
names = {"token": "powernorm", "message": "msgnorm", "plain": "plain"}
for k in args.k:
    for mode in args.modes.split(","):
        c = JSCCodec(JSCConfig(d_model=512, k=k, skip=True, power="token" if mode == "plain" else mode))
        c.set_stats(H); init_pca(c, H); c.eval()
        name, codec = f"pca{k}-{names[mode]}", Plain(c) if mode == "plain" else c
        hyps, _ = transmit_examples(base, codec, test, "none", math.inf, backend="ct2")
        out[name] = stats.wer_ci(word_errors_per_utt(refs, hyps)); print(name, out[name], flush=True)
        json.dump(out, open(path, "w"), indent=1)
