"""Encode a prompt file once into safetensors shards, so that runs read embeddings instead of loading text encoders.

    python -m scaled_runs.encode_prompts --config scaled_runs/configs/pixart_sim.yaml --out embeds/pixart [--shard_size 4096]
    # then: ... distill_pixart.py --config ... --prompt_embeddings embeds/pixart   (T5-XXL is not loaded: -9 GiB)

The script is chosen by the config (``distill_pixart`` or ``align_sdxl``); its own ``text_embeddings`` function
encodes (the same call a run makes without shards), so a run with shards sees bit-identical embeddings.
Layout of ``--out``: ``index.json`` (prompts in file order, shard sizes, the script and its encoding settings),
``shard_00000.safetensors`` ... (batch-first tensors, one row per prompt), ``uncond.safetensors`` (one row: the
unconditional embedding). Every shard is written to ``.tmp`` and renamed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

__all__ = ["PromptStore", "encode_to_shards", "main"]

# settings that change the embeddings: a store written with other values is refused
ENCODING_KEYS = {"distill_pixart": ("max_sequence_length", "negative_prompt", "pretrained", "tiny", "seed"),
                 "align_sdxl": ("pretrained", "tiny", "seed")}


def _save(tensors: dict, path: Path) -> None:
    from safetensors.torch import save_file
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in sorted(tensors.items())}, str(tmp))
    os.replace(tmp, path)


def encode_to_shards(script: str, cfg, parts, out, shard_size: int = 4096, batch_size: int = 64,
                     progress: bool = True) -> Path:
    """Encode ``parts.prompts`` with ``scaled_runs.<script>.text_embeddings`` into ``out`` (see module docstring)."""
    import importlib
    mod = importlib.import_module(f"scaled_runs.{script}")
    if shard_size < 1 or batch_size < 1:
        raise ValueError(f"shard_size={shard_size} and batch_size={batch_size} must be positive")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    prompts = list(parts.prompts)
    shards = []
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(prompts), desc="encode prompts")
    for s, start in enumerate(range(0, len(prompts), shard_size)):
        chunk = prompts[start:start + shard_size]
        rows: dict = {}
        for i in range(0, len(chunk), batch_size):
            cond, _ = mod.text_embeddings(parts, cfg, chunk[i:i + batch_size], "cpu", guided=False)
            for k, v in cond.items():
                rows.setdefault(k, []).append(v)
            if bar is not None:
                bar.update(len(chunk[i:i + batch_size]))
        name = f"shard_{s:05d}.safetensors"
        _save({k: torch.cat(v) for k, v in rows.items()}, out / name)
        shards.append({"file": name, "start": start, "count": len(chunk)})
    if bar is not None:
        bar.close()
    _, uncond = mod.text_embeddings(parts, cfg, prompts[:1], "cpu", guided=True)
    _save(uncond, out / "uncond.safetensors")
    index = {"script": script, "prompts": prompts, "shards": shards,
             "encoding": {k: getattr(cfg, k) for k in ENCODING_KEYS[script]}}
    (out / "index.json").write_text(json.dumps(index, indent=1, sort_keys=True))
    return out


class PromptStore:
    """Read-only view of a folder written by :func:`encode_to_shards`: ``prompts`` and ``embeddings(prompts)``."""

    def __init__(self, folder, script: str, cfg=None):
        folder = Path(folder)
        if not (folder / "index.json").is_file():
            raise ValueError(f"prompt_embeddings={str(folder)!r} holds no index.json (write it with "
                             "python -m scaled_runs.encode_prompts)")
        index = json.loads((folder / "index.json").read_text())
        if index["script"] != script:
            raise ValueError(f"prompt_embeddings={str(folder)!r} was written for {index['script']}, not {script}")
        if cfg is not None:
            diff = {k: (v, getattr(cfg, k)) for k, v in index["encoding"].items() if getattr(cfg, k) != v}
            if diff:
                raise ValueError(f"prompt_embeddings={str(folder)!r} was encoded with other settings "
                                 f"{ {k: a for k, (a, _) in diff.items()} } than this run's "
                                 f"{ {k: b for k, (_, b) in diff.items()} }; re-encode")
        self.folder, self.prompts, self.shards = folder, list(index["prompts"]), index["shards"]
        self.row = {}
        for si, sh in enumerate(self.shards):
            for j in range(sh["count"]):
                self.row.setdefault(self.prompts[sh["start"] + j], (si, j))
        self._cache: dict = {}

    def _shard(self, si: int) -> dict:
        if si not in self._cache:
            from safetensors.torch import load_file
            if len(self._cache) >= 2:               # keep at most two shards in memory
                self._cache.pop(next(iter(self._cache)))
            self._cache[si] = load_file(str(self.folder / self.shards[si]["file"]))
        return self._cache[si]

    def embeddings(self, prompts, device) -> dict:
        """Batch-first tensors of ``prompts`` (each must be in the store)."""
        missing = [p for p in prompts if p not in self.row]
        if missing:
            raise ValueError(f"prompts {missing[:3]} are not in prompt_embeddings={str(self.folder)!r}")
        rows = [self.row[p] for p in prompts]
        keys = self._shard(rows[0][0]).keys()
        return {k: torch.stack([self._shard(si)[k][j] for si, j in rows]).to(device) for k in keys}

    def uncond(self, n: int, device) -> dict:
        from safetensors.torch import load_file
        u = load_file(str(self.folder / "uncond.safetensors"))
        return {k: v[:1].expand(n, *v.shape[1:]).to(device) for k, v in u.items()}


def main(argv=None) -> Path:
    import importlib

    from scaled_runs.config import parse_config
    from scaled_runs.plan import script_of
    parser = argparse.ArgumentParser(description="encode a run's prompts once into safetensors shards")
    parser.add_argument("--config", required=True, help="the run's YAML config (its prompts and text encoders)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--shard_size", type=int, default=4096)
    parser.add_argument("--encode_batch", type=int, default=64)
    args, overrides = parser.parse_known_args(argv)
    script = script_of(args.config)
    if script not in ENCODING_KEYS:
        raise ValueError(f"{args.config} is a {script} config: it has no text encoder to precompute")
    mod = importlib.import_module(f"scaled_runs.{script}")
    cfg = parse_config(mod.CONFIG, ["--config", args.config, *overrides, "--prompt_embeddings", ""])
    parts = mod.text_parts(cfg)            # the pipeline's text encoders and the prompts only
    return encode_to_shards(script, cfg, parts, args.out, args.shard_size, args.encode_batch)


if __name__ == "__main__":
    main()
