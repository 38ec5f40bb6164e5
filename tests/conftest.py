"""Shared test set-up: no model hub, one local Ray instance per pytest session, tiny models."""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import logging  # noqa: E402

import pyarrow.fs as pafs  # noqa: E402
import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if os.environ.get("GREFINE_REAL_WEIGHTS") == "1":
        return
    skip = pytest.mark.skip(reason="needs pretrained weights; set GREFINE_REAL_WEIGHTS=1 on a machine that has them")
    for item in items:
        if "real_weights" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance shared by every test that needs it (start-up costs ~4 s and ~650 MB)."""
    import ray
    if not ray.is_initialized():
        tmp = tempfile.mkdtemp(prefix="grefine-ray-")
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            _temp_dir=tmp,
            ignore_reinit_error=True,
            runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1"}},
        )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_preset():
    from grefine_curate.curate.config import load_preset

    return load_preset("tiny")


@pytest.fixture(scope="session")
def preset(tiny_preset):
    """Short names for model tests (a module may override them)."""
    return tiny_preset


@pytest.fixture(scope="session")
def tiny_clip(tiny_preset):
    from grefine_curate.curate.clip_models import load_clip

    return load_clip(tiny_preset.clip)


@pytest.fixture(scope="session")
def clip(tiny_clip):
    return tiny_clip


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models on 2 shared cores: OpenMP with 2 threads spins and runs tiny convs far slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1 (random port), one per test session: (the environment a client needs
    to reach it, a pyarrow S3FileSystem on it)."""
    import moto.server as moto_server  # moto[server]: in the `test` extra (pip install -e '.[test]')

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    before = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    fs = pafs.S3FileSystem(endpoint_override=env["AWS_ENDPOINT_URL"], access_key="testing", secret_key="testing",
                           region="us-east-1", allow_bucket_creation=True, allow_bucket_deletion=True)
    try:
        yield env, fs
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    """A 80x48 random RGB PNG (the CLI tests' one image)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("img") / "cat.png"
    Image.fromarray(rng.integers(0, 255, (48, 80, 3), dtype=np.uint8)).save(path)
    return path
