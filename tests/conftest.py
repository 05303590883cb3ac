import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def tiny_whisper_package(folder):
    """(tiny random whisper LoadedModel, split, path of its exported package): the server tests' stand-in."""
    import torch

    from semedge.export.package import build_package
    from semedge.semcom.jsc import JSCCodec, JSCConfig
    from semedge.semcom.models import tiny_model
    from semedge.semcom.split import build_split

    loaded = tiny_model("whisper")
    torch.manual_seed(1)
    split = build_split(loaded, JSCCodec(JSCConfig(d_model=64, k=16, hidden=64, skip=True)))  # skip: as the shipped codec
    return loaded, split, build_package(split, folder)


@pytest.fixture
def one_torch_thread():
    """Small convs and tiny models on a shared CPU: one torch thread (2 threads under load ran 35x slower)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
