"""Shared test settings: hypothesis profiles sized for a 2-core CI machine."""

import os

import torch
from hypothesis import HealthCheck, settings

# Without a GPU, Triton kernels run in its interpreter. The flag must be set before the first test
# module imports anything that defines a kernel: set per test file, it came too late whenever an
# earlier file (eval, kv_cache, search) had already imported the kernels, and 12 tests failed.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

settings.register_profile(
    "ci", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
settings.register_profile("dev", max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
