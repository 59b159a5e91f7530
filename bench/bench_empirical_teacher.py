"""The exact empirical teacher at full CIFAR size: time and peak memory against a plain matmul + logsumexp.

    python bench/bench_empirical_teacher.py [--sizes 1000 10000 50000] [--batch 64] [--cifar-root DIR]
                                            [--dtype float32|float64] [--threads N]

For N reference images of shape 3x32x32 and a batch of B noisy queries at one t, both versions compute the
exact posterior mean E[x0 | x_t] and score of the empirical distribution (handbook Eq. 7):

* ``library``: ``toy_data.EmpiricalDistribution(points).posterior_mean`` / ``.score`` (chunked running
  log-sum-exp, the points kept as given);
* ``plain``: the dozen lines anyone would write: ``x @ points.T``, a softmax, ``weights @ points``.

Each (version, N) runs in its own subprocess; peak memory is the growth of the process's maximum
resident set size beyond the data itself (``ru_maxrss``). The work is two B x N x D matrix products
(4 B N D flops); the last column divides it by the matmul throughput measured on this machine at the
same shapes, i.e. how close each version runs to the time of its matrix products alone.
With ``--cifar-root`` the points are the CIFAR-10 training images (``toy_data.load_cifar10``); without it,
the 1000 packaged test images are tiled with a +-1/255 jitter up to N (timing does not depend on content).
"""
from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402


def _points(n: int, root: str | None, dtype: torch.dtype) -> torch.Tensor:
    from toy_data.cifar import load_cifar10, load_cifar10_sample
    if root:
        x, _ = load_cifar10(root, split="train", dtype=dtype)
        if n > len(x):
            raise SystemExit(f"--sizes {n} exceeds the {len(x)} training images")
        return x[:n].contiguous()
    base, _ = load_cifar10_sample(dtype=dtype)
    g = torch.Generator().manual_seed(0)
    out = torch.empty(n, 3, 32, 32, dtype=dtype)
    for i in range(0, n, len(base)):
        k = min(len(base), n - i)
        out[i:i + k] = base[:k] + (torch.randint(-1, 2, (k, 3, 32, 32), generator=g) / 127.5).to(dtype)
    return out


def plain(points: torch.Tensor, x: torch.Tensor, a: float, s: float):
    """The reference a reader writes in a dozen lines (no chunking)."""
    P = points.reshape(len(points), -1)
    q = x.reshape(len(x), -1)
    logits = (a * (q @ P.T) - 0.5 * a * a * (P * P).sum(1)[None]) / (s * s)     # -|q - aP|^2/2s^2 + const(q)
    r = torch.softmax(logits, 1)
    post = r @ P
    return post, -(q - a * post) / (s * s)


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(args) -> None:
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    from dstar_edu.process import DDPM
    from toy_data.mixtures import EmpiricalDistribution
    points = _points(args.n, args.cifar_root, dtype)
    p = DDPM()
    t = 300
    a, s = float(p.alpha(t)), float(p.sigma(t))
    x = (a * points[:args.batch] + s * torch.randn(points[:args.batch].shape, dtype=dtype,
                                                   generator=torch.Generator().manual_seed(1)))
    base = _rss_mib()
    if args.version == "matmul":
        P = points.reshape(len(points), -1)
        q = x.reshape(len(x), -1)
        r = torch.zeros(len(q), len(P), dtype=dtype)
        best = math.inf
        for _ in range(3):
            t0 = time.perf_counter()
            logits = q @ P.T
            post = r @ P
            best = min(best, time.perf_counter() - t0)
        print(json.dumps({"seconds": best, "extra_mib": _rss_mib() - base}))
        return
    if args.version == "library":
        dist = EmpiricalDistribution(points, process=p)
        def run():
            post = dist.posterior_mean(x, t)
            return post, -(x - a * post) / (s * s)      # the score from the same pass (Tweedie)
    else:
        run = lambda: plain(points, x, a, s)  # noqa: E731
    post, score = run()
    best = math.inf
    for _ in range(2):
        t0 = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t0)
    print(json.dumps({"seconds": best, "extra_mib": _rss_mib() - base,
                      "post_checksum": float(post.double().sum()), "score_checksum": float(score.double().sum())}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 50000])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--cifar-root", default=None)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--version", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    print(f"B = {args.batch} queries, 3x32x32, {args.dtype}, {args.threads} thread(s), "
          f"points: {'CIFAR-10 train' if args.cifar_root else 'packaged sample tiled'}")
    print(f"{'N':>6} {'version':>8} {'seconds':>8} {'extra MiB':>9} {'x matmul time':>13}")
    for n in args.sizes:
        out = {}
        for version in ("matmul", "plain", "library"):
            cmd = [sys.executable, __file__, "--child", "1", "--n", str(n), "--version", version, "--batch",
                   str(args.batch), "--dtype", args.dtype, "--threads", str(args.threads)]
            if args.cifar_root:
                cmd += ["--cifar-root", args.cifar_root]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode:
                raise SystemExit(res.stderr)
            out[version] = json.loads(res.stdout.strip().splitlines()[-1])
        for version in ("plain", "library"):
            r = out[version]
            print(f"{n:>6} {version:>8} {r['seconds']:8.3f} {r['extra_mib']:9.0f} "
                  f"{r['seconds'] / out['matmul']['seconds']:13.2f}")
        rel = abs(out["plain"]["post_checksum"] - out["library"]["post_checksum"]) / abs(out["plain"]["post_checksum"])
        print(f"{n:>6} {'matmul':>8} {out['matmul']['seconds']:8.3f} {'':>9} "
              f"{4 * args.batch * n * 3072 / out['matmul']['seconds'] / 1e9:10.1f} GFLOP/s; "
              f"posterior checksums agree to {rel:.1e}")


if __name__ == "__main__":
    main()
