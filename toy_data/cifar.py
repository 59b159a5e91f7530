"""CIFAR-10 loading without torchvision.

``load_cifar10`` reads the standard "CIFAR-10 python version" files from a data folder, either the
extracted ``cifar-10-batches-py/`` folder or the ``cifar-10-python.tar.gz`` archive (read straight
from the tar), and can download the archive. ``load_cifar10_sample`` reads the small set of real test
images shipped next to the project (``../shared/data/cifar10_test1000.npz``), and
``image_dataset_for_checks`` gives images for numerical checks: that sample when it is present,
seeded smooth synthetic images otherwise.

Images are returned as (N, 3, 32, 32) tensors scaled to [-1, 1] (``x / 127.5 - 1``), labels as int64.
The batch files are pickles: only load files from the official source or that you created yourself.
"""

from __future__ import annotations

import hashlib
import numbers
import os
import pickle
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "CIFAR10_CLASSES",
    "CIFAR10_URL",
    "CIFAR10_MD5",
    "CIFAR10_ARCHIVE",
    "CIFAR10_FOLDER",
    "SAMPLE_ENV_VAR",
    "load_cifar10",
    "find_cifar10_sample",
    "load_cifar10_sample",
    "image_dataset_for_checks",
]

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR10_FOLDER = "cifar-10-batches-py"
SAMPLE_ENV_VAR = "DSTAR_EDU_CIFAR_SAMPLE"
SAMPLE_FILENAME = "cifar10_test1000.npz"

_SPLIT_FILES = {
    "train": tuple(f"data_batch_{i}" for i in range(1, 6)),
    "test": ("test_batch",),
}
_REPO_ROOT = Path(__file__).resolve().parent.parent


def _to_unit_range(x_uint8: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """uint8 array -> float tensor in [-1, 1] (0 -> -1, 255 -> 1)."""
    return torch.from_numpy(np.ascontiguousarray(x_uint8)).to(dtype) / 127.5 - 1.0


# ----------------------------------------------------------------------------- checksum / download


def _md5(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex MD5 digest of a file, read in chunks."""
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_size), b""):
            h.update(chunk)
    return h.hexdigest()


def _verify_md5(path: str | os.PathLike, expected: str) -> None:
    """Raise ``RuntimeError`` and delete ``path`` if its MD5 differs from ``expected``."""
    actual = _md5(path)
    if actual != expected.lower():
        Path(path).unlink(missing_ok=True)
        raise RuntimeError(
            f"MD5 checksum mismatch for {path}: expected {expected}, got {actual}. "
            "The corrupt file was deleted; download it again."
        )


def _download(url: str, dest: Path) -> None:
    """Download ``url`` to ``dest`` with a tqdm progress bar (via a ``.part`` file)."""
    from tqdm.auto import tqdm

    part = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(part, "wb") as f:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=dest.name) as bar:
                for chunk in iter(lambda: response.read(1 << 20), b""):
                    f.write(chunk)
                    bar.update(len(chunk))
        part.replace(dest)
    except (urllib.error.URLError, OSError) as err:
        part.unlink(missing_ok=True)
        raise RuntimeError(
            f"Could not download CIFAR-10 from {url} ({err}). Download it on a machine with "
            f"network access and put {CIFAR10_ARCHIVE} (or the extracted {CIFAR10_FOLDER}/ folder) "
            f"into {dest.parent}."
        ) from err


# ----------------------------------------------------------------------------- full dataset


def _decode_batch(batch: dict, name: str) -> tuple[np.ndarray, np.ndarray]:
    data = np.asarray(batch[b"data"], dtype=np.uint8)
    labels = np.asarray(batch[b"labels"], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
        raise ValueError(f"{name}: expected data of shape (N, 3072) and N labels, got "
                         f"data {data.shape} and {len(labels)} labels")
    return data.reshape(-1, 3, 32, 32), labels


def _read_batches(root: Path, names: tuple[str, ...]) -> list[tuple[np.ndarray, np.ndarray]]:
    folder = root / CIFAR10_FOLDER
    if all((folder / name).is_file() for name in names):
        out = []
        for name in names:
            with open(folder / name, "rb") as f:
                out.append(_decode_batch(pickle.load(f, encoding="bytes"), name))
        return out
    with tarfile.open(root / CIFAR10_ARCHIVE, "r:gz") as tar:
        out = []
        for name in names:
            f = tar.extractfile(f"{CIFAR10_FOLDER}/{name}")
            if f is None:
                raise ValueError(f"{root / CIFAR10_ARCHIVE}: member {CIFAR10_FOLDER}/{name} is not a file")
            with f:
                out.append(_decode_batch(pickle.load(f, encoding="bytes"), name))
        return out


def load_cifar10(
    root: str | os.PathLike,
    split: str = "train",
    download: bool = False,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load CIFAR-10 from ``root``: images (N, 3, 32, 32) in [-1, 1] and int64 labels (N,).

    ``root`` must contain the extracted ``cifar-10-batches-py/`` folder or ``cifar-10-python.tar.gz``.
    ``split="train"`` concatenates ``data_batch_1..5`` in order (50000 images), ``"test"`` is
    ``test_batch`` (10000). With ``download=True`` a missing archive is downloaded and MD5-checked.
    """
    if split not in _SPLIT_FILES:
        raise ValueError(f"split must be one of {sorted(_SPLIT_FILES)}, got split={split!r}")
    root = Path(root).expanduser()
    names = _SPLIT_FILES[split]
    folder_ok = all((root / CIFAR10_FOLDER / name).is_file() for name in names)
    archive = root / CIFAR10_ARCHIVE
    if not folder_ok and not archive.is_file():
        if not download:
            raise FileNotFoundError(
                f"CIFAR-10 not found in root={str(root)!r}: put either {CIFAR10_ARCHIVE} or the "
                f"extracted {CIFAR10_FOLDER}/ folder (with {', '.join(names)}) there, "
                "or pass download=True when online."
            )
        root.mkdir(parents=True, exist_ok=True)
        _download(CIFAR10_URL, archive)
        _verify_md5(archive, CIFAR10_MD5)
    batches = _read_batches(root, names)
    x = np.concatenate([b[0] for b in batches])
    y = np.concatenate([b[1] for b in batches])
    return _to_unit_range(x, dtype), torch.from_numpy(y)


# ----------------------------------------------------------------------------- shipped sample


def _sample_candidates() -> list[Path]:
    """Places searched for the sample npz (after an explicit path), in order."""
    places = []
    env = os.environ.get(SAMPLE_ENV_VAR)
    if env:
        places.append(Path(env).expanduser())
    rel = Path("shared") / "data" / SAMPLE_FILENAME
    places += [_REPO_ROOT.parent / rel, Path.cwd() / rel, Path.cwd().parent / rel]
    return places


def find_cifar10_sample() -> Path | None:
    """Path of ``cifar10_test1000.npz`` (env var, then ``<repo>/../shared/data``, then cwd), or None."""
    return next((p for p in _sample_candidates() if p.is_file()), None)


def load_cifar10_sample(
    n: int | None = None,
    path: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """First n (all if None) real CIFAR-10 test images of the shipped sample: (x in [-1, 1], y).

    ``path`` overrides the search; otherwise the places of :func:`find_cifar10_sample` are tried.
    """
    if path is not None:
        places = [Path(path).expanduser()]
        found = places[0] if places[0].is_file() else None
    else:
        places = _sample_candidates()
        found = find_cifar10_sample()
    if found is None:
        raise FileNotFoundError(
            f"{SAMPLE_FILENAME} not found; searched: {', '.join(str(p) for p in places)}. "
            f"Pass path= or set {SAMPLE_ENV_VAR}."
        )
    with np.load(found) as data:
        x, y = data["x"], data["y"]
    if n is not None:
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or not 0 < n <= len(x):
            raise ValueError(f"n must be None or an integer in [1, {len(x)}], got n={n!r}")
        x, y = x[:n], y[:n]
    return _to_unit_range(x.transpose(0, 3, 1, 2), dtype), torch.from_numpy(y.astype(np.int64))


def _synthetic_images(n: int, generator: torch.Generator | None, dtype: torch.dtype) -> torch.Tensor:
    """Smooth random images: bilinearly upsampled 4x4 fields (shared luminance + colour) plus noise."""
    f64 = torch.float64
    luminance = torch.randn(n, 1, 4, 4, generator=generator, dtype=f64)
    colour = torch.randn(n, 3, 4, 4, generator=generator, dtype=f64)
    field = 0.5 * luminance + 0.25 * colour
    x = F.interpolate(field, size=(32, 32), mode="bilinear", align_corners=False)
    x = x + 0.03 * torch.randn(n, 3, 32, 32, generator=generator, dtype=f64)
    return x.clamp(-1.0, 1.0).to(dtype)


def image_dataset_for_checks(
    n: int = 64,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, str]:
    """n images (n, 3, 32, 32) in [-1, 1] for numerical checks, and their source label.

    Uses a generator-seeded random subset of the real CIFAR-10 sample (label ``"cifar10_test1000"``)
    when :func:`find_cifar10_sample` finds it, else seeded smooth synthetic images (``"synthetic"``).
    """
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n <= 0:
        raise ValueError(f"n must be a positive integer, got n={n!r}")
    path = find_cifar10_sample()
    if path is None:
        return _synthetic_images(int(n), generator, dtype), "synthetic"
    x, _ = load_cifar10_sample(path=path, dtype=dtype)
    if n > len(x):
        raise ValueError(f"n must be at most {len(x)} (size of the CIFAR-10 sample), got n={n!r}")
    idx = torch.randperm(len(x), generator=generator)[:n]
    return x[idx], "cifar10_test1000"
