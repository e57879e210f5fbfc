"""LoRA/DoRA task vectors and merges against peft's own ``merge_and_unload`` (docs/lora.md).

    python benchmarks/peft_parity.py                    # the current code only
    python benchmarks/peft_parity.py --old 79fd35d~1    # also the code at a git revision

Adapters are built by peft (tests/unit/test_peft_parity.py's builder: tiny random BERT, random
A/B and DoRA magnitudes, ``save_pretrained``). For every case it prints max |τ| and the error
max |θ₀ + τ − peft's merged weight| of ``mergeflow.models.lora.lora_delta``; then the error of two
merges against ``θ₀ + λ Σ_t w_t (θ_t − θ₀)`` with θ_t from peft. ``--old REV`` runs
``models/lora.py`` and ``engine/lora.py`` as they were at REV beside the current ones.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from safetensors.torch import save_file  # noqa: E402

from mergeflow.engine.lora import merge_lora_adapters  # noqa: E402
from mergeflow.models.lora import lora_delta, read_adapter  # noqa: E402
from tests.unit.test_peft_parity import CASES, make_adapter, peft_merged, tiny  # noqa: E402


def load_old(rev: str, rel: str, tmp: Path):
    """The module at ``src/mergeflow/<rel>`` as it was at git revision ``rev``."""
    src = subprocess.run(
        ["git", "show", f"{rev}:src/mergeflow/{rel}"], cwd=ROOT, check=True, capture_output=True
    ).stdout
    f = tmp / rel.replace("/", "_")
    f.write_bytes(src)
    spec = importlib.util.spec_from_file_location(f.stem, f)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def err(got: dict, want: dict) -> float:
    return max(float((got[k] - want[k]).abs().max()) for k in want)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", help="git revision to compare with")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="peft-parity-"))
    old_models = load_old(args.old, "models/lora.py", tmp) if args.old else None
    old_engine = load_old(args.old, "engine/lora.py", tmp) if args.old else None
    sd0 = {k: v.contiguous() for k, v in tiny().state_dict().items()}
    enc = {k.removeprefix("bert."): v for k, v in sd0.items() if k.startswith("bert.")}
    print("| adapter | max \\|τ\\| | old error | error now |\n|---|---:|---:|---:|")
    for case, kw in CASES.items():
        d = make_adapter(tmp / case, 1, **kw)
        want = {k.removeprefix("bert."): v for k, v in peft_merged(d).items()}
        sd, cfg = read_adapter(d)
        new = lora_delta(sd, cfg, "bert", enc)
        tau = max(float((want[k] - enc[k]).abs().max()) for k in new)
        now = err({k: enc[k] + v for k, v in new.items()}, {k: want[k] for k in new})
        was = "–"
        if old_models:
            old = old_models.lora_delta(sd, cfg, "bert")
            was = f"{err({k: enc[k] + v for k, v in old.items()}, {k: want[k] for k in old}):.3g}"
        print(f"| {case} | {tau:.3g} | {was} | {now:.2g} |")
    base = tmp / "base.safetensors"
    save_file(sd0, str(base))
    a = make_adapter(tmp / "dora_a", 1, use_dora=True)
    b = make_adapter(tmp / "dora_b", 2, use_dora=True)
    ta, tb = peft_merged(a), peft_merged(b)
    runs = {
        "one DoRA adapter, weight 0.5": ({"a": a}, {"scaling": 0.5}, {"a": 0.5}),
        "two DoRA adapters, λ 0.8, w (1, −0.5)": (
            {"a": a, "b": b},
            {"scaling": 0.8, "weights": {"a": 1.0, "b": -0.5}},
            {"a": 0.8, "b": -0.4},
        ),
    }
    thetas = {"a": ta, "b": tb}
    for name, (ads, params, coef) in runs.items():
        want = {k: v + sum(c * (thetas[t][k] - v) for t, c in coef.items()) for k, v in sd0.items()}
        out = tmp / f"new-{len(ads)}"
        merge_lora_adapters(ads, out, base=base, **params)
        line = f"{name}: error now {err(peft_merged(out), want):.2g}"
        if old_engine:
            try:
                old_engine.merge_lora_adapters(ads, tmp / f"old-{len(ads)}", **params)
                line += f", old {err(peft_merged(tmp / f'old-{len(ads)}'), want):.3g}"
            except ValueError as e:
                line += f", old refused: {e}"
        print(line)


if __name__ == "__main__":
    main()
