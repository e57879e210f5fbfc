"""Merge-engine benchmark: mergeflow vs mergekit 0.1.5 vs naive load-everything vs the I/O floor.

Synthetic BERT-large-shaped (24 layers, hidden 1024, BertForMaskedLM names incl. pooler and
cls.predictions.transform.*) fp16 checkpoints: a base and 8 experts (base + small noise), ~0.67 GB
each. Every tool runs as its own process; we record wall time and the peak *anonymous* memory of
the process tree (RssAnon from /proc, sampled every 10 ms; safetensors mmaps files, so max RSS
would count page cache). Cold I/O = every input byte read once after evicting the files from the
page cache (posix_fadvise DONTNEED); warm = the same again.

    python benchmarks/merge_engine.py --workdir /tmp/mergebench            # everything
    python benchmarks/merge_engine.py --only mergeflow --methods ta,ties   # a subset

mergekit is installed into its own venv under benchmarks/peers/ (torch==2.13.0 first, then
mergekit==0.1.5); it is never imported here. Outputs are compared with mergekit's where the
definitions coincide (task arithmetic; TIES with per-tensor density and sign by summed mass).
The workdir (~6 GB inputs + outputs) is deleted at the end unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
PEER = ROOT / "benchmarks" / "peers" / "mergekit-venv"
TASKS = [f"task{i}" for i in range(8)]
DENSITY = 0.2

# method key -> (mergeflow method + --set, mergekit yaml method + per-model params + globals)
METHODS = {
    "ta": (
        ["task_arithmetic", "scaling=0.3"],
        ("task_arithmetic", {"weight": 0.3}, {}),
    ),
    "ties": (
        ["ties", f"density={DENSITY}", "scope=tensor", "scaling=1.0"],
        ("ties", {"weight": 1.0, "density": DENSITY}, {"normalize": True}),
    ),
    "dare_ties": (
        ["dare", f"drop_rate={1 - DENSITY}", "combine=ties", "rescale=l1", "scaling=1.0"],
        ("dare_ties", {"weight": 1.0, "density": DENSITY}, {"normalize": True}),
    ),
}


# --------------------------------------------------------------------------- inputs


def bert_large_shapes():
    import torch
    from transformers import BertConfig, BertForMaskedLM, BertModel

    cfg = BertConfig(
        hidden_size=1024,
        num_hidden_layers=24,
        num_attention_heads=16,
        intermediate_size=4096,
        architectures=["BertForMaskedLM"],
        torch_dtype="float16",
    )
    with torch.device("meta"):
        mlm = BertForMaskedLM(cfg)
        pooled = BertModel(cfg, add_pooling_layer=True)
    shapes = {}
    for k, v in mlm.state_dict().items():
        if k == "cls.predictions.decoder.weight":  # tied to the word embeddings
            continue
        if k.startswith("cls.predictions.decoder.bias"):
            continue
        shapes[k] = tuple(v.shape)
    for k, v in pooled.state_dict().items():  # mergekit's bert-masked-lm table wants a pooler
        if k.startswith("pooler."):
            shapes["bert." + k] = tuple(v.shape)
    return cfg, shapes


def make_inputs(work: Path) -> dict[str, Path]:
    import torch
    from safetensors.torch import save_file

    cfg, shapes = bert_large_shapes()
    paths = {"base": work / "base", **{t: work / t for t in TASKS}}
    if all((p / "model.safetensors").exists() for p in paths.values()):
        return paths
    g = torch.Generator().manual_seed(0)
    base = {}
    for k, s in shapes.items():
        if "LayerNorm.weight" in k:
            base[k] = (1 + 0.02 * torch.randn(s, generator=g)).half()
        else:
            base[k] = (0.02 * torch.randn(s, generator=g)).half()
    for name, p in paths.items():
        p.mkdir(parents=True, exist_ok=True)
        cfg.to_json_file(str(p / "config.json"))
        if name == "base":
            sd = base
        else:
            sd = {
                k: (v.float() + 0.002 * torch.randn(v.shape, generator=g)).half()
                for k, v in base.items()
            }
        save_file(sd, str(p / "model.safetensors"), metadata={"format": "pt"})
        del sd
        print(f"  wrote {p} ({(p / 'model.safetensors').stat().st_size / 1e9:.2f} GB)", flush=True)
    return paths


# --------------------------------------------------------------------------- measuring


def _anon_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def run_measured(cmd: list[str], env=None, cwd=None) -> dict:
    """Run ``cmd``; wall time and peak RssAnon summed over the process tree."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    peak = 0
    stop = threading.Event()

    def sample():
        nonlocal peak
        ps = psutil.Process(proc.pid)
        pids, tick = [proc.pid], 0
        while not stop.is_set():
            if tick % 20 == 0:  # refresh the process tree every 0.2 s, RssAnon every 10 ms
                try:
                    pids = [proc.pid] + [c.pid for c in ps.children(recursive=True)]
                except psutil.NoSuchProcess:
                    break
            tick += 1
            peak = max(peak, sum(_anon_kib(p) for p in pids))
            time.sleep(0.01)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, _ = proc.communicate()
    wall = time.perf_counter() - t0
    stop.set()
    th.join()
    if proc.returncode != 0:
        print(out[-4000:])
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}")
    return {"seconds": round(wall, 2), "peak_anon_gib": round(peak / 1024**2, 3)}


def evict(paths: list[Path]) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_all(paths: list[Path]) -> tuple[float, int]:
    t0 = time.perf_counter()
    n = 0
    buf = bytearray(8 << 20)
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while True:
                k = f.readinto(buf)
                if not k:
                    break
                n += k
    return time.perf_counter() - t0, n


# --------------------------------------------------------------------------- tools


def ensure_mergekit() -> Path:
    exe = PEER / "bin" / "mergekit-yaml"
    if exe.exists():
        return exe
    PEER.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", str(PEER)], check=True)
    pip = [str(PEER / "bin" / "pip"), "install", "-q"]
    subprocess.run([*pip, "torch==2.13.0"], check=True)  # first: keeps pip off CUDA builds
    subprocess.run([*pip, "mergekit==0.1.5"], check=True)
    return exe


def mergekit_config(key: str, paths: dict[str, Path]) -> str:
    import yaml

    method, per_model, glob = METHODS[key][1]
    cfg = {
        "merge_method": method,
        "base_model": str(paths["base"]),
        "models": [{"model": str(paths[t]), "parameters": dict(per_model)} for t in TASKS],
        "parameters": dict(glob),
        "dtype": "float32",
        "out_dtype": "float16",
    }
    return yaml.safe_dump(cfg, sort_keys=False)


NAIVE = r"""
import sys, json, torch
from safetensors.torch import load_file, save_file
from mergeflow import methods
paths = json.loads(sys.argv[1]); out = sys.argv[2]; method = sys.argv[3]; hp = json.loads(sys.argv[4])
base = load_file(paths["base"] + "/model.safetensors")
experts = {t: load_file(p + "/model.safetensors") for t, p in paths.items() if t != "base"}
merged = methods.merge(method, base, experts, **hp)
save_file(merged, out + "/model.safetensors")
"""


def _sets(args: list[str]) -> dict:
    import yaml

    return {k: yaml.safe_load(v) for k, v in (a.split("=", 1) for a in args)}


def compare(a: Path, b: Path) -> dict:
    """Agreement of two merged checkpoints on the tensors both contain."""
    import torch
    from safetensors import safe_open

    fa = safe_open(str(a), "pt")
    fb = safe_open(str(b), "pt")
    common = sorted(set(fa.keys()) & set(fb.keys()))
    only_a = sorted(set(fa.keys()) - set(fb.keys()))
    max_abs = 0.0
    n = n_diff = 0
    for k in common:
        x, y = fa.get_tensor(k).float(), fb.get_tensor(k).float()
        d = (x - y).abs()
        max_abs = max(max_abs, float(d.max()) if d.numel() else 0.0)
        # fp16 output: call two values equal within 1 fp16 ulp of the larger magnitude
        tol = torch.maximum(x.abs(), y.abs()) * 2**-10 + 1e-7
        n_diff += int((d > tol).sum())
        n += d.numel()
    return {
        "tensors_compared": len(common),
        "tensors_only_in_mergeflow": only_a,
        "max_abs_diff": max_abs,
        "frac_elements_beyond_1ulp": n_diff / max(n, 1),
    }


def _out_file(d: Path) -> Path:
    files = sorted(d.glob("*.safetensors"))
    if len(files) != 1:
        raise SystemExit(f"{d}: expected one output shard, found {files}")
    return files[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", default="/tmp/mergeflow-bench")
    ap.add_argument("--methods", default="ta,ties,dare_ties")
    ap.add_argument("--only", default="io,mergeflow,mergekit,naive")
    ap.add_argument("--naive-methods", default="ta")
    ap.add_argument("--keep", action="store_true", help="keep the workdir")
    ap.add_argument("--results", default=None, help="write the results JSON here too")
    a = ap.parse_args()
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    only = set(a.only.split(","))
    keys = a.methods.split(",")
    res: dict = {"cpus": os.cpu_count(), "loadavg_start": os.getloadavg()}
    try:
        print("inputs:", flush=True)
        paths = make_inputs(work)
        files = [paths[n] / "model.safetensors" for n in ["base", *TASKS]]
        res["input_gb"] = round(sum(f.stat().st_size for f in files) / 1e9, 2)
        if "io" in only:
            evict(files)
            cold, nbytes = read_all(files)
            warm, _ = read_all(files)
            res["io_floor"] = {
                "cold_s": round(cold, 2),
                "warm_s": round(warm, 2),
                "gb": round(nbytes / 1e9, 2),
            }
            print("io floor:", res["io_floor"], flush=True)
        read_all(files)  # warm cache for everything below
        mf = str(Path(sys.executable).with_name("mergeflow"))
        for key in keys:
            mf_args, _ = METHODS[key]
            row = res.setdefault(key, {})
            out_mf = work / f"out-mergeflow-{key}"
            if "mergeflow" in only:
                cmd = [
                    mf,
                    "merge",
                    "--no-progress",
                    "--method",
                    mf_args[0],
                    "--base",
                    str(paths["base"]),
                    "--out",
                    str(out_mf),
                    "--workers",
                    "2",
                ]
                for t in TASKS:
                    cmd += ["--expert", f"{t}={paths[t]}"]
                for s in mf_args[1:]:
                    cmd += ["--set", s]
                row["mergeflow"] = run_measured(cmd)
                print(key, "mergeflow", row["mergeflow"], flush=True)
            if "mergekit" in only:
                exe = ensure_mergekit()
                cfgf = work / f"mergekit-{key}.yaml"
                cfgf.write_text(mergekit_config(key, paths))
                out_mk = work / f"out-mergekit-{key}"
                shutil.rmtree(out_mk, ignore_errors=True)
                env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
                row["mergekit"] = run_measured(
                    [
                        str(exe),
                        str(cfgf),
                        str(out_mk),
                        "--no-copy-tokenizer",
                        "--no-write-model-card",
                        "--random-seed",
                        "0",
                        "--quiet",
                    ],
                    env=env,
                )
                print(key, "mergekit", row["mergekit"], flush=True)
                if "mergeflow" in only:
                    row["agreement"] = compare(_out_file(out_mf), _out_file(out_mk))
                    print(key, "agreement", row["agreement"], flush=True)
                shutil.rmtree(out_mk, ignore_errors=True)
            if "naive" in only and key in a.naive_methods.split(","):
                out_nv = work / f"out-naive-{key}"
                out_nv.mkdir(exist_ok=True)
                p = {n: str(v) for n, v in paths.items()}
                row["naive"] = run_measured(
                    [
                        sys.executable,
                        "-c",
                        NAIVE,
                        json.dumps(p),
                        str(out_nv),
                        mf_args[0],
                        json.dumps(_sets(mf_args[1:])),
                    ]
                )
                print(key, "naive", row["naive"], flush=True)
                if "mergeflow" in only:
                    row["naive_vs_mergeflow"] = compare(
                        _out_file(out_mf), out_nv / "model.safetensors"
                    )
                shutil.rmtree(out_nv, ignore_errors=True)
            shutil.rmtree(out_mf, ignore_errors=True)
        res["loadavg_end"] = os.getloadavg()
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    text = json.dumps(res, indent=2)
    print(text)
    if a.results:
        Path(a.results).write_text(text + "\n")


if __name__ == "__main__":
    main()
