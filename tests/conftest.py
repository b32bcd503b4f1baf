"""Shared pytest fixtures.

* ``photos_dir`` (session): the photographs that scikit-image ships, written as JPEG/PNG into a folder.
* ``skimage_photo`` / ``photo_writer`` (session): the helpers behind ``photos_dir`` as functions.
* ``ray_local`` (session): an embedded local Ray (2 CPUs, no dashboard) with the environment that Ray
  needs on the reference machine (``RAY_TEST_ENV``); shut down at the end.

Fixtures here are self-contained; add new ones below without changing these.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

# name -> (file name, array factory). camera and coins are grayscale; the rest RGB; all <= 640 px.
PHOTOS = {
    "astronaut": "astronaut.jpg",
    "coffee": "coffee.jpg",
    "chelsea": "chelsea.jpg",
    "rocket": "rocket.jpg",
    "camera": "camera.jpg",      # grayscale JPEG
    "coins": "coins.png",        # grayscale PNG
    "immunohistochemistry": "immunohistochemistry.png",
    "colorwheel": "colorwheel.jpg",
}

RAY_TEST_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled",
                "RAY_USAGE_STATS_ENABLED": "0"}


def photo_array(name: str) -> np.ndarray:
    """uint8 ``[H, W]`` or ``[H, W, 3]`` scikit-image photograph ``name``."""
    import skimage.data

    return np.asarray(getattr(skimage.data, name)())


def write_photos(folder: Path, names: list[str] | None = None) -> list[Path]:
    """Write the photos (JPEG quality 90 / PNG) into ``folder``; returns the paths."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for name in names or list(PHOTOS):
        fname = PHOTOS[name]
        path = folder / fname
        img = Image.fromarray(photo_array(name))
        if fname.endswith(".jpg"):
            img.save(path, format="JPEG", quality=90)
        else:
            img.save(path, format="PNG")
        out.append(path)
    return out


@pytest.fixture(scope="session")
def photos_dir(tmp_path_factory) -> Path:
    """Folder with the scikit-image photographs of :data:`PHOTOS` (treat as read-only; copy to modify)."""
    folder = tmp_path_factory.mktemp("photos")
    write_photos(folder)
    return folder


@pytest.fixture(scope="session")
def skimage_photo():
    """The function :func:`photo_array` (``name -> uint8 array``), for tests that build inputs from photos."""
    return photo_array


@pytest.fixture(scope="session")
def photo_writer():
    """The function :func:`write_photos` (``(folder, names) -> paths``)."""
    return write_photos


@pytest.fixture(scope="session")
def ray_local():
    """Embedded local Ray for the whole session (``ray.init(address="local", num_cpus=2, ...)``)."""
    for k, v in RAY_TEST_ENV.items():
        os.environ.setdefault(k, v)
    ray = pytest.importorskip("ray")
    started = False
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=256 * 2**20,
                 logging_level="WARNING")
        started = True
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture()
def one_thread():
    """One intra-op torch thread for the test: tiny tensors gain nothing from threads, and OpenMP
    oversubscription on shared 2-core runners made tiny training tests 50x slower."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture()
def moto_s3(tmp_path, monkeypatch):
    """A moto S3 server on 127.0.0.1 (own process, stopped by its PID) and the AWS_* environment for it."""
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    server = Path(sys.executable).parent / "moto_server"
    assert server.exists(), "moto_server missing: install polymae[dev] (scripts/setup.sh)"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp_path / "moto.log", "wb")
    proc = subprocess.Popen([str(server), "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=log)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1"}
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        # fsspec caches S3FileSystem instances; one made for an earlier test's server (another port) would
        # be reused, since the endpoint comes from the environment and is not part of the cache key
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()
        yield env
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="module")
def one_thread_module():
    """:func:`one_thread` for a whole module (``pytestmark = [..., pytest.mark.usefixtures("one_thread_module")]``)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
