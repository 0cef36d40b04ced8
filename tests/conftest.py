"""Shared fixtures. TRITON_INTERPRET must be set before any kernel module is imported."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.helpers import tiny_config, tiny_model  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture
def config():
    return tiny_config()


@pytest.fixture
def model():
    return tiny_model()
