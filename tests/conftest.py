"""Shared test setup: fixed seeds and one CPU thread (CI machines are small and shared)."""

import os
import random
import tempfile

import numpy as np
import pytest
import torch

torch.set_num_threads(1)
# The model fingerprint memoizes file hashes in a user cache: keep tests out of ~/.cache.
os.environ.setdefault("CWA_CACHE_DIR", tempfile.mkdtemp(prefix="cwa-test-cache-"))
# Progress lines in a log come every 10 s: on a loaded machine a slow test would see them
# between the lines it checks; tests of progress itself set the interval they need.
os.environ["CWA_PROGRESS_INTERVAL"] = "inf"


@pytest.fixture(autouse=True)
def _fixed_seeds():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
