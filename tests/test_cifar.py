import hashlib
import io
import pickle
import re
import tarfile
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

from toy_data import cifar

BATCHES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
PER_BATCH = 3


def _scaled(byte, dtype=torch.float32):
    """The exact value the loaders produce for a uint8 byte."""
    return torch.tensor(byte, dtype=dtype) / 127.5 - 1


def _batch(b: int) -> dict:
    """Batch b: image j has first byte 10*b + j, then a ramp; image 0 is pure colour planes."""
    data = (np.arange(3072)[None, :] + 7 * np.arange(PER_BATCH)[:, None]) % 256
    data[:, 0] = 10 * b + np.arange(PER_BATCH)
    data[0] = np.repeat([0, 255, 51], 1024)  # red plane 0, green 255, blue 51
    labels = [(b + j) % 10 for j in range(PER_BATCH)]
    return {b"batch_label": b"fixture", b"data": data.astype(np.uint8), b"labels": labels}


def _write_fixture(root: Path, as_tar: bool) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    blobs = {name: pickle.dumps(_batch(b)) for b, name in enumerate(BATCHES)}
    blobs["batches.meta"] = pickle.dumps({b"label_names": [c.encode() for c in cifar.CIFAR10_CLASSES]})
    if as_tar:
        path = root / "cifar-10-python.tar.gz"
        with tarfile.open(path, "w:gz") as tar:
            for name, blob in blobs.items():
                info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))
        return path
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    for name, blob in blobs.items():
        (folder / name).write_bytes(blob)
    return folder


@pytest.mark.parametrize("as_tar", [False, True])
def test_load_fixture_exact_values(tmp_path, as_tar):
    _write_fixture(tmp_path, as_tar)
    x, y = cifar.load_cifar10(tmp_path, split="train")
    assert x.shape == (5 * PER_BATCH, 3, 32, 32) and x.dtype == torch.float32
    assert y.dtype == torch.int64
    # train = data_batch_1..5 in order: first byte encodes (batch, image)
    first = torch.tensor([10 * b + j for b in range(5) for j in range(PER_BATCH)], dtype=torch.float32)
    expected_first = first / 127.5 - 1
    expected_first[::PER_BATCH] = -1.0  # image 0 of each batch has a red plane of zeros
    assert torch.allclose(x[:, 0, 0, 0], expected_first)
    assert y.tolist() == [(b + j) % 10 for b in range(5) for j in range(PER_BATCH)]
    # channel-major: first 1024 bytes are red, then green, then blue; 0 -> -1, 255 -> 1
    assert (x[0, 0] == -1.0).all() and (x[0, 1] == 1.0).all()
    assert (x[0, 2] == _scaled(51)).all()
    # ramp image: byte k = (k + 7j) % 256 at (c, h, w) with k = 1024c + 32h + w
    raw = (torch.arange(3072) + 7) % 256
    raw[0] = 1
    assert torch.equal(x[1], (raw.float() / 127.5 - 1).reshape(3, 32, 32))
    assert x[1, 1, 2, 3] == _scaled((1024 + 64 + 3 + 7) % 256)
    assert x.min() >= -1 and x.max() <= 1

    xt, yt = cifar.load_cifar10(tmp_path, split="test", dtype=torch.float64)
    assert xt.shape == (PER_BATCH, 3, 32, 32) and xt.dtype == torch.float64
    assert xt[1, 0, 0, 0] == _scaled(51, torch.float64) == 51 / 127.5 - 1
    assert yt.tolist() == [(5 + j) % 10 for j in range(PER_BATCH)]


def test_folder_and_tar_agree(tmp_path):
    _write_fixture(tmp_path / "a", as_tar=False)
    _write_fixture(tmp_path / "b", as_tar=True)
    xa, ya = cifar.load_cifar10(tmp_path / "a")
    xb, yb = cifar.load_cifar10(str(tmp_path / "b"))
    assert torch.equal(xa, xb) and torch.equal(ya, yb)


@pytest.mark.parametrize("split", ["val", "Train", None])
def test_bad_split(tmp_path, split):
    with pytest.raises(ValueError, match=r"split.*test.*train"):
        cifar.load_cifar10(tmp_path, split=split)


def test_missing_files_message(tmp_path):
    root = tmp_path / "nothing_here"
    with pytest.raises(FileNotFoundError) as info:
        cifar.load_cifar10(root)
    msg = str(info.value)
    assert str(root) in msg
    assert "cifar-10-python.tar.gz" in msg and "cifar-10-batches-py" in msg
    assert "download=True" in msg


def test_md5_helpers(tmp_path):
    f = tmp_path / "abc.bin"
    f.write_bytes(b"abc")
    assert cifar._md5(f) == "900150983cd24fb0d6963f7d28e17f72"
    cifar._verify_md5(f, "900150983CD24FB0D6963F7D28E17F72")  # case-insensitive, keeps file
    assert f.exists()
    with pytest.raises(RuntimeError, match="MD5"):
        cifar._verify_md5(f, "0" * 32)
    assert not f.exists()


def test_download_bad_checksum_deletes_file(tmp_path, monkeypatch):
    calls = []

    def fake_download(url, dest):
        calls.append(url)
        Path(dest).write_bytes(b"this is not the CIFAR-10 archive")

    monkeypatch.setattr(cifar, "_download", fake_download)
    with pytest.raises(RuntimeError, match="MD5 checksum mismatch.*deleted"):
        cifar.load_cifar10(tmp_path, download=True)
    assert calls == [cifar.CIFAR10_URL]
    assert not (tmp_path / "cifar-10-python.tar.gz").exists()


def test_download_then_load(tmp_path, monkeypatch):
    src = _write_fixture(tmp_path / "src", as_tar=True)
    monkeypatch.setattr(cifar, "CIFAR10_MD5", hashlib.md5(src.read_bytes()).hexdigest())
    monkeypatch.setattr(cifar, "_download", lambda url, dest: Path(dest).write_bytes(src.read_bytes()))
    x, y = cifar.load_cifar10(tmp_path / "data", split="test", download=True)
    assert x.shape == (PER_BATCH, 3, 32, 32) and y.tolist() == [5, 6, 7]
    # files present: download=True does not download again
    monkeypatch.setattr(cifar, "_download", lambda url, dest: pytest.fail("downloaded twice"))
    cifar.load_cifar10(tmp_path / "data", split="test", download=True)


def test_download_failure_explains_manual_setup(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(cifar.urllib.request, "urlopen", offline)
    with pytest.raises(RuntimeError) as info:
        cifar.load_cifar10(tmp_path, download=True)
    msg = str(info.value)
    assert "cifar-10-python.tar.gz" in msg and str(tmp_path) in msg and "no network" in msg
    assert list(tmp_path.iterdir()) == []  # no partial file left behind


def test_classes_and_no_torchvision():
    assert cifar.CIFAR10_CLASSES == (
        "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
    )
    src = Path(cifar.__file__).read_text()
    assert not re.search(r"^\s*(import|from)\s+torchvision", src, re.MULTILINE)


def test_load_packaged_sample():
    path = cifar.find_cifar10_sample()
    assert path == Path(cifar.__file__).parent / "data" / "cifar10_test1000.npz"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == cifar.SAMPLE_SHA256
    with np.load(path) as data:
        raw_x, raw_y = data["x"], data["y"]
    x, y = cifar.load_cifar10_sample(n=10)
    assert x.shape == (10, 3, 32, 32) and x.min() >= -1 and x.max() <= 1
    expected0 = torch.from_numpy(raw_x[0]).permute(2, 0, 1).float() / 127.5 - 1
    assert torch.equal(x[0], expected0)
    assert y.tolist() == raw_y[:10].tolist()
    xa, ya = cifar.load_cifar10_sample(path=path, dtype=torch.float64)
    assert xa.shape == (1000, 3, 32, 32) and xa.dtype == torch.float64
    assert torch.bincount(ya, minlength=10).tolist() == [100] * 10
    assert xa.std() > 0.3  # real images, not a constant


def test_nothing_reads_outside_the_repository():
    """The package and the tests never name the developers' sibling data folder: a user's clone has nothing beside it."""
    root = Path(__file__).resolve().parents[1]
    for folder in ("dstar_edu", "toy_data", "tests", "scaled_runs", "bench", "notebooks"):
        for f in (root / folder).rglob("*"):
            if f.suffix in (".py", ".ipynb", ".sh", ".yaml", ".toml") and f.name != Path(__file__).name:
                text = f.read_text(errors="replace")
                assert not re.search(r"\.\./shared|parents\[2\] */ *\"shared\"", text), f


def _npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def test_sample_env_override_and_errors(tmp_path, monkeypatch):
    x = np.arange(4 * 32 * 32 * 3, dtype=np.int64).reshape(4, 32, 32, 3) % 256
    f = _npz(tmp_path / "mine.npz", x=x.astype(np.uint8), y=np.array([3, 1, 4, 1]))
    monkeypatch.setenv(cifar.SAMPLE_ENV_VAR, str(f))
    assert cifar.find_cifar10_sample() == f
    xs, ys = cifar.load_cifar10_sample(n=2)
    assert ys.tolist() == [3, 1] and ys.dtype == torch.int64
    assert xs[0, 0, 0, 1] == _scaled(3)  # HWC -> CHW: pixel (0, 1) red is byte 3
    assert xs[0, 2, 0, 0] == _scaled(2)
    with pytest.raises(ValueError, match=r"n=5 must be an integer in 1..4"):
        cifar.load_cifar10_sample(n=5)
    _, source = cifar.image_dataset_for_checks(2, generator=torch.Generator().manual_seed(0))
    assert "mine.npz" in source                       # checks record that the data came from elsewhere

    monkeypatch.setenv(cifar.SAMPLE_ENV_VAR, str(tmp_path / "missing.npz"))   # a typo is an error, not ignored
    with pytest.raises(FileNotFoundError, match=f"{cifar.SAMPLE_ENV_VAR}.*missing.npz"):
        cifar.find_cifar10_sample()
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        cifar.image_dataset_for_checks(4)
    with pytest.raises(FileNotFoundError, match="path=.*nope.npz"):
        cifar.load_cifar10_sample(path=tmp_path / "nope.npz")


def test_missing_or_damaged_packaged_sample_says_how_to_fix(tmp_path, monkeypatch):
    monkeypatch.delenv(cifar.SAMPLE_ENV_VAR, raising=False)
    monkeypatch.setattr(cifar, "_packaged_sample", lambda: tmp_path / "cifar10_test1000.npz")
    with pytest.raises(FileNotFoundError, match="installation is incomplete.*Reinstall"):
        cifar.image_dataset_for_checks(4)                # no silent synthetic fallback
    (tmp_path / "cifar10_test1000.npz").write_text("version https://git-lfs.github.com/spec/v1\n")
    with pytest.raises(ValueError, match="damaged.*SHA-256"):
        cifar.load_cifar10_sample()


GOOD_X = np.zeros((3, 32, 32, 3), np.uint8)


@pytest.mark.parametrize("arrays, message", [
    ({"x": GOOD_X.astype(np.float32) / 255, "y": np.zeros(3, np.int64)}, r"'x' is float32.*not rescaled floats"),
    ({"x": GOOD_X, "y": np.array([0, 10, 3])}, r"labels must be integers in 0..9.*\[10\]"),
    ({"x": GOOD_X, "y": np.array([0, -1, 3])}, r"labels must be integers in 0..9"),
    ({"x": GOOD_X, "y": np.zeros(2, np.int64)}, r"'y' has shape \(2,\) but there are 3 images"),
    ({"x": GOOD_X[:, :16], "y": np.zeros(3, np.int64)}, r"shape \(3, 16, 32, 3\)"),
    ({"images": GOOD_X}, r"missing array\(s\) \['x', 'y'\]"),
    ({"x": np.array([{"a": 1}], dtype=object), "y": np.zeros(1)}, r"pickled Python objects"),
])
def test_bad_sample_files_name_the_file_and_the_problem(tmp_path, arrays, message):
    f = _npz(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match=message) as info:
        cifar.load_cifar10_sample(path=f)
    assert str(f) in str(info.value) and "allow_pickle=True" not in str(info.value)


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 truncated zip", b"not an npz at all"])
def test_corrupt_sample_file(tmp_path, content):
    f = tmp_path / "corrupt.npz"
    f.write_bytes(content)
    with pytest.raises(ValueError, match="corrupt.npz.*not a readable npz"):
        cifar.load_cifar10_sample(path=f)


def test_corrupt_cifar_archive_and_batches(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "cifar-10-python.tar.gz").write_bytes(b"this is not a gzip file")
    with pytest.raises(ValueError, match=r"cifar-10-python.tar.gz is not a readable.*Get a good copy.*MD5"):
        cifar.load_cifar10(tmp_path / "a", split="test")
    folder = _write_fixture(tmp_path / "b", as_tar=False)
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8)})[:20])  # truncated
    with pytest.raises(ValueError, match=r"test_batch is not a readable CIFAR-10 batch \(.*Error"):
        cifar.load_cifar10(tmp_path / "b", split="test")
    (folder / "test_batch").write_bytes(pickle.dumps({b"pixels": 1}))
    with pytest.raises(ValueError, match=r"test_batch is not a CIFAR-10 batch.*b'data'"):
        cifar.load_cifar10(tmp_path / "b", split="test")
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 12]}))
    with pytest.raises(ValueError, match=r"test_batch: labels must be integers in 0..9"):
        cifar.load_cifar10(tmp_path / "b", split="test")


class _Evil:
    def __reduce__(self):
        return (print, ("code ran while loading a CIFAR batch",))


def test_tampered_batch_is_refused_without_running_code(tmp_path, capsys):
    folder = _write_fixture(tmp_path, as_tar=False)
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": _Evil(), b"labels": [0]}))
    with pytest.raises(ValueError, match=r"refusing to load builtins.print"):
        cifar.load_cifar10(tmp_path, split="test")
    assert "code ran" not in capsys.readouterr().out


def test_python2_style_batch_loads(tmp_path):
    """The official files were pickled by Python 2 (protocol 2, byte-string keys): they must load."""
    folder = _write_fixture(tmp_path, as_tar=False)
    batch = {b"data": np.full((2, 3072), 7, np.uint8), b"labels": [1, 2], b"batch_label": b"testing batch 1 of 1"}
    (folder / "test_batch").write_bytes(pickle.dumps(batch, protocol=2))
    x, y = cifar.load_cifar10(tmp_path, split="test")
    assert y.tolist() == [1, 2] and torch.equal(x, torch.full((2, 3, 32, 32), 7 / 127.5 - 1))


def test_image_dataset_for_checks_draws_real_images():
    x, source = cifar.image_dataset_for_checks(16, generator=torch.Generator().manual_seed(0))
    assert source == "cifar10_test1000"
    assert x.shape == (16, 3, 32, 32) and x.dtype == torch.float64
    x2, _ = cifar.image_dataset_for_checks(16, generator=torch.Generator().manual_seed(0))
    x3, _ = cifar.image_dataset_for_checks(16, generator=torch.Generator().manual_seed(1))
    assert torch.equal(x, x2) and not torch.equal(x, x3)
    full, _ = cifar.load_cifar10_sample(dtype=torch.float64)
    match = (full[None] == x[:, None]).flatten(2).all(dim=2)  # (16, 1000)
    assert (match.sum(dim=1) >= 1).all()  # every image comes from the sample
    assert len({int(i) for i in match.float().argmax(dim=1)}) == 16  # without repeats
    with pytest.raises(ValueError, match="n=0 must be a positive integer"):
        cifar.image_dataset_for_checks(0)
    with pytest.raises(ValueError, match="at most 1000"):
        cifar.image_dataset_for_checks(1001)
