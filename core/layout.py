"""The device package's layout: file names and the manifest format.

export/package.py writes this layout; runtime/package.py and runtime/server.py read
it. Both sides import these names, so the writer and the readers cannot drift.

    device.onnx                                   the device half (ONNX_FILE)
    frontend.json, mel_filters.npy                speech: log-mel parameters + filterbank
    tokenizer.json, tokenizer_config.json, special_tokens_map.json   text
    server/jsc.safetensors, server/jsc.json       the JSC decoder (the device ignores server/)
    server/adapters.safetensors                   the decoder's LoRA adapters, when trained with them
    device.ort, required_operators.config         ORT Mobile targets: the ORT-format model + its operator config
    manifest.json                                 sha256 of every other file, io, plan, profile, figures
    signature.json                                signed packages: Ed25519 over manifest.json (not listed in it)
"""

FORMAT = "semedge-package/1"
MANIFEST = "manifest.json"
SIGNATURE = "signature.json"  # runtime/trust.py; the one file besides manifest.json that files does not list
ONNX_FILE = "device.onnx"
FRONTEND_FILE = "frontend.json"
MEL_FILTERS_FILE = "mel_filters.npy"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
TEXT_TOKENIZER_FILES = (TOKENIZER_FILE, TOKENIZER_CONFIG_FILE, "special_tokens_map.json")
SERVER_DIR = "server"
JSC_WEIGHTS = f"{SERVER_DIR}/jsc.safetensors"
JSC_CONFIG = f"{SERVER_DIR}/jsc.json"
ADAPTERS = f"{SERVER_DIR}/adapters.safetensors"
# ORT Mobile targets (phones, watches) also get the ORT-format model and its reduced operator
# config (onnxruntime.tools.convert_onnx_models_to_ort); manifest["target"]["ort_format"] names them.
ORT_FILE = "device.ort"
ORT_OPS_CONFIG = "required_operators.config"
