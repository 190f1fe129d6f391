"""Torch-side export: a timm model's state dict -> safetensors (timm key names) + manifest.

Runs where PyTorch and timm are installed (the [reference] extra); the Flax side then loads the
file torch-free with `bob_jax.backbones.create(name, weights=<file>)`. The manifest records the
versions, the file's SHA-256 and reference logits on a fixed input, so a torch-less machine (e.g. a
GPU box) can check parity against stored activations.

    python converters/export_torch.py resnet50.a1_in1k --out exports/ [--pretrained] [--seed 0]

Without --pretrained, the model's parameters are re-drawn at random with the parity tests' helper
(`bob_jax.testing.reference.redraw_parameters`), so no download is needed.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import numpy as np


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("name", help="timm arch.tag, e.g. resnet50.a1_in1k")
    p.add_argument("--out", required=True, type=pathlib.Path)
    p.add_argument("--pretrained", action="store_true", help="download timm's pretrained weights")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=224, help="input size of the stored reference forward")
    args = p.parse_args(argv)

    import safetensors.numpy
    import timm
    import torch

    from bob_jax.io import sha256_file
    from bob_jax.testing.reference import redraw_parameters, state_dict_numpy

    model = timm.create_model(args.name, pretrained=args.pretrained).eval()
    if not args.pretrained:
        redraw_parameters(model, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    weights = args.out / f"{args.name}.safetensors"
    tensors = {k: np.ascontiguousarray(v) for k, v in state_dict_numpy(model).items()}
    safetensors.numpy.save_file(tensors, str(weights))

    x = np.random.default_rng(args.seed).standard_normal((2, 3, args.size, args.size)).astype(np.float32)
    with torch.no_grad():
        logits = model(torch.from_numpy(x)).numpy()
    np.savez(args.out / f"{args.name}.reference.npz", input_nchw=x, logits=logits)
    manifest = {
        "name": args.name,
        "pretrained": args.pretrained,
        "seed": args.seed,
        "file": weights.name,
        "sha256": sha256_file(weights),
        "num_tensors": len(tensors),
        "versions": {"torch": torch.__version__, "timm": timm.__version__},
        "reference": f"{args.name}.reference.npz",
    }
    (args.out / f"{args.name}.manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(json.dumps(manifest, indent=2))


if __name__ == "__main__":
    main()
