"""CIFAR-10 loading without torchvision.

``load_cifar10`` reads the standard "CIFAR-10 python version" files from a data folder, either the
extracted ``cifar-10-batches-py/`` folder or the ``cifar-10-python.tar.gz`` archive (read straight
from the tar), and can download the archive. ``load_cifar10_sample`` reads the 1000 real test images
shipped inside this package (``toy_data/data/cifar10_test1000.npz``, provenance in the README beside
it), and ``image_dataset_for_checks`` draws the images the numerical checks run on from that sample.

Images are returned as (N, 3, 32, 32) tensors scaled to [-1, 1] (``x / 127.5 - 1``), labels as int64.
The batch files are pickles: they are read with an unpickler that only accepts the few numpy types a
CIFAR-10 batch contains, so a tampered file is refused instead of executing code.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import pickle
import tarfile
import urllib.error
import urllib.request
import zipfile
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from dstar_edu.validation import check_choice, check_int

__all__ = [
    "CIFAR10_CLASSES",
    "CIFAR10_URL",
    "CIFAR10_MD5",
    "CIFAR10_ARCHIVE",
    "CIFAR10_FOLDER",
    "SAMPLE_ENV_VAR",
    "load_cifar10",
    "SAMPLE_SHA256",
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
SAMPLE_SHA256 = "470f9203f4a499b73b5fbabece628d114e85a874aae776bfcadc02a278a27f79"
#: the source label that checks record in their details for images drawn from the packaged sample
SAMPLE_SOURCE = "cifar10_test1000"

_SPLIT_FILES = {
    "train": tuple(f"data_batch_{i}" for i in range(1, 6)),
    "test": ("test_batch",),
}
_GET_A_GOOD_COPY = (
    f"Get a good copy: delete it and download {CIFAR10_ARCHIVE} again from {CIFAR10_URL} "
    f"(MD5 {CIFAR10_MD5}), or call load_cifar10(root, download=True) on a machine with network access."
)


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


class _BatchUnpickler(pickle.Unpickler):
    """Unpickler for CIFAR-10 batches: only the numpy array machinery a batch needs may be loaded."""

    _ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
                ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
                ("numpy._core.multiarray", "scalar"), ("numpy.core.numeric", "_frombuffer"),
                ("numpy._core.numeric", "_frombuffer"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not part of a CIFAR-10 batch")
        if module.startswith("numpy.core.") and hasattr(np, "_core"):   # numpy >= 2 moved it; skip the shim
            module = "numpy._core." + module[len("numpy.core."):]
        return super().find_class(module, name)


def _decode_batch(f, where: str) -> tuple[np.ndarray, np.ndarray]:
    """One pickled batch (file object) -> uint8 images (N, 3, 32, 32) and int64 labels; errors name ``where``."""
    try:
        batch = _BatchUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError,
            IndexError, OSError, tarfile.TarError) as err:
        raise ValueError(f"{where} is not a readable CIFAR-10 batch ({type(err).__name__}: {err}). "
                         + _GET_A_GOOD_COPY) from err
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise ValueError(f"{where} is not a CIFAR-10 batch: expected a dict with keys b'data' and b'labels', "
                         f"got {keys}. " + _GET_A_GOOD_COPY)
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[b"labels"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or labels.shape != (len(data),):
        raise ValueError(f"{where}: expected uint8 data of shape (N, 3072) and N labels, got data "
                         f"{data.dtype} {data.shape} and labels of shape {labels.shape}. " + _GET_A_GOOD_COPY)
    _check_labels(labels, where)
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def _check_labels(labels: np.ndarray, where: str) -> None:
    if labels.size and (not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0 or labels.max() > 9):
        bad = labels[(labels < 0) | (labels > 9)][:5] if np.issubdtype(labels.dtype, np.number) else labels[:5]
        raise ValueError(f"{where}: labels must be integers in 0..9 (the CIFAR-10 classes), got "
                         f"{labels.dtype} values such as {bad.tolist()}")


def _read_batches(root: Path, names: tuple[str, ...]) -> list[tuple[np.ndarray, np.ndarray]]:
    folder = root / CIFAR10_FOLDER
    if all((folder / name).is_file() for name in names):
        out = []
        for name in names:
            with open(folder / name, "rb") as f:
                out.append(_decode_batch(f, str(folder / name)))
        return out
    archive = root / CIFAR10_ARCHIVE
    try:
        with tarfile.open(archive, "r:gz") as tar:
            out = []
            for name in names:
                member = f"{CIFAR10_FOLDER}/{name}"
                try:
                    f = tar.extractfile(member)
                except KeyError:
                    f = None
                if f is None:
                    raise ValueError(f"{archive}: has no file {member}; it is not a complete CIFAR-10 archive. "
                                     + _GET_A_GOOD_COPY)
                with f:
                    out.append(_decode_batch(io.BytesIO(f.read()), f"{archive}:{member}"))
            return out
    except (tarfile.TarError, EOFError, OSError) as err:
        raise ValueError(f"{archive} is not a readable {CIFAR10_ARCHIVE} ({type(err).__name__}: {err}). "
                         + _GET_A_GOOD_COPY) from err


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
    check_choice("split", split, sorted(_SPLIT_FILES))
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


def _packaged_sample() -> Path:
    """The sample inside the installed package (``toy_data/data/``)."""
    return Path(str(resources.files("toy_data") / "data" / SAMPLE_FILENAME))


def find_cifar10_sample() -> Path:
    """Path of the real CIFAR-10 sample: ``$DSTAR_EDU_CIFAR_SAMPLE`` if set, else the packaged file.

    Raises ``FileNotFoundError`` (saying how to fix it) when the file the search lands on is missing.
    """
    env = os.environ.get(SAMPLE_ENV_VAR)
    if env:
        path = Path(env).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{SAMPLE_ENV_VAR}={env!r} does not name a file; point it to a "
                                    f"{SAMPLE_FILENAME}-style npz or unset it to use the packaged sample")
        return path
    path = _packaged_sample()
    fix = (f"Reinstall dstar-edu from a full clone of its repository (the file is tracked in git as "
           f"toy_data/data/{SAMPLE_FILENAME}), or set {SAMPLE_ENV_VAR} to a good copy of it")
    if not path.is_file():
        raise FileNotFoundError(f"the packaged CIFAR-10 sample {path} is missing: the installation is "
                                f"incomplete. {fix}")
    if _sha256(path) != SAMPLE_SHA256:
        raise ValueError(f"the packaged CIFAR-10 sample {path} is damaged (SHA-256 {_sha256(path)}, expected "
                         f"{SAMPLE_SHA256}; a git LFS pointer or a partial checkout looks like this). {fix}")
    return path


@functools.lru_cache(maxsize=4)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _sha256(path: Path) -> str:
    st = path.stat()
    return _sha256_cached(str(path), st.st_size, st.st_mtime_ns)


def _read_sample(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Validated ``x`` (uint8, N x 32 x 32 x 3) and ``y`` (labels 0..9) of a sample npz; errors name the file.

    Cached per (file, size, modification time); the arrays are read-only.
    """
    st = path.stat()
    return _read_sample_cached(path, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _read_sample_cached(path: Path, size: int, mtime_ns: int) -> tuple[np.ndarray, np.ndarray]:
    how = (f"Expected an npz with uint8 'x' of shape (N, 32, 32, 3) and integer 'y' in 0..9, like the "
           f"packaged toy_data/data/{SAMPLE_FILENAME}.")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"PK\x03\x04":
        raise ValueError(f"{path} is not a readable npz (it is not a zip archive: starts with {magic!r}). {how}")
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in ("x", "y") if k not in data.files]
            if missing:
                raise ValueError(f"{path}: missing array(s) {missing} (has {data.files}). {how}")
            x, y = data["x"], data["y"]
    except ValueError as err:
        if "allow_pickle" in str(err):
            raise ValueError(f"{path} holds pickled Python objects, which are not loaded from a file of "
                             f"unknown origin. {how}") from None
        if str(path) in str(err):
            raise
        raise ValueError(f"{path} is not a readable npz ({err}). {how}") from err
    except (zipfile.BadZipFile, EOFError, OSError) as err:
        raise ValueError(f"{path} is not a readable npz ({type(err).__name__}: {err}). {how}") from err
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != (32, 32, 3):
        raise ValueError(f"{path}: 'x' is {x.dtype} of shape {x.shape}; pixel bytes are needed, not "
                         f"rescaled floats. {how}")
    if y.shape != (len(x),):
        raise ValueError(f"{path}: 'y' has shape {y.shape} but there are {len(x)} images. {how}")
    _check_labels(y, str(path))
    x.flags.writeable = False
    y.flags.writeable = False
    return x, y


def load_cifar10_sample(
    n: int | None = None,
    path: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """First n (all if None) real CIFAR-10 test images of the packaged sample: (x in [-1, 1], y).

    ``path`` overrides :func:`find_cifar10_sample` (the env var, then the packaged file).
    """
    if path is not None:
        found = Path(path).expanduser()
        if not found.is_file():
            raise FileNotFoundError(f"path={str(path)!r} is not a file; pass a {SAMPLE_FILENAME}-style npz "
                                    "or leave path=None for the packaged sample")
    else:
        found = find_cifar10_sample()
    x, y = _read_sample(found)
    if n is not None:
        check_int("n", n, lo=1, hi=len(x))
        x, y = x[:n], y[:n]
    return _to_unit_range(x.transpose(0, 3, 1, 2), dtype), torch.from_numpy(y.astype(np.int64))


def image_dataset_for_checks(
    n: int = 64,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, str]:
    """n real CIFAR-10 images (n, 3, 32, 32) in [-1, 1] for numerical checks, and their source label.

    A generator-seeded random subset, without repeats, of the packaged sample (:func:`load_cifar10_sample`);
    the label (``"cifar10_test1000"``, or the file name when ``$DSTAR_EDU_CIFAR_SAMPLE`` points elsewhere)
    is what checks record as their data source. There is no synthetic fallback: a missing sample is an error.
    """
    check_int("n", n, lo=1)
    path = find_cifar10_sample()
    x, _ = load_cifar10_sample(path=path, dtype=dtype)
    if n > len(x):
        raise ValueError(f"n must be at most {len(x)} (size of the CIFAR-10 sample {path.name}), got n={n!r}")
    idx = torch.randperm(len(x), generator=generator)[:n]
    source = SAMPLE_SOURCE if path == _packaged_sample() else f"{SAMPLE_SOURCE}-style file {path.name}"
    return x[idx], source
