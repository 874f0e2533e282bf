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
# No test may reach the network: the hub's endpoint is a closed local port (a test that
# forgets to stay offline fails fast instead of waiting for DNS or downloading), and the
# hub caches are a fresh empty directory, never the user's. Tests of the offline and
# cache behaviour set what they need themselves.
os.environ.setdefault("HF_ENDPOINT", "http://127.0.0.1:9")
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="cwa-test-hf-"))


@pytest.fixture(autouse=True)
def _fixed_seeds():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
