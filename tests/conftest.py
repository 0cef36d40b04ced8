"""Shared fixtures. TRITON_INTERPRET must be set before any kernel module is imported."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.helpers import EMBEDDED, ROOT, tiny_config, tiny_model  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture
def config():
    return tiny_config()


@pytest.fixture
def model():
    return tiny_model()


@pytest.fixture(scope="session")
def collected(tmp_path_factory):
    """AR targets of the embedded base for 64 training prompts (collected once per test session)."""
    import nld_lora
    from nld_lora.data import CollectConfig, collect, read_prompts

    out = tmp_path_factory.mktemp("collected")
    model = nld_lora.load(EMBEDDED)
    records, _ = read_prompts(ROOT / "data" / "prompts" / "code_train.jsonl", limit=64)
    collect(model, records, out, CollectConfig(max_new_tokens=64, batch_size=32), progress=False)
    return out
