"""Convert a backbone's PyTorch/safetensors checkpoint into an Orbax checkpoint + manifest.

    python -m converters.convert --model tf_efficientnet_lite0.offline --out converted/lite0
    python -m converters.convert --model resnet50.a1_in1k --checkpoint resnet50.safetensors --out converted/r50

Torch-free: the checkpoint is read by bob_jax.io and mapped by the family's key table with strict
accounting. The output loads with `bob_jax.backbones.create(NAME, weights=OUT)`. The manifest holds
the source file's SHA-256, package versions, the architecture kwargs and the converted model's
logits on a fixed input batch (`bob_jax.backbones.converted.fixed_input`), re-checked on load by
`--verify`.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m converters.convert", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="arch.tag from bob_jax.backbones.list_backbones()")
    p.add_argument("--checkpoint", default=None, help="local checkpoint (default: the tag's pretrained weights)")
    p.add_argument("--checkpoint_key", default=None, help="sub-dict of a nested checkpoint, e.g. state_dict")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--num_classes", type=int, default=None, help="drop or keep the classifier head")
    p.add_argument("--size", type=int, default=None, help="input size of the recorded logits (default: the tag's)")
    args = p.parse_args(argv)

    from bob_jax import backbones
    from bob_jax.backbones import converted
    from bob_jax.convert import abstract_leaves
    from bob_jax.results import environment_info

    kwargs = {} if args.num_classes is None else {"num_classes": args.num_classes}
    weights = args.checkpoint or "pretrained"
    model = backbones.create(args.model, weights=weights, weights_key=args.checkpoint_key, **kwargs)
    size = args.size or model.preprocess.input_size
    out = backbones.forward(model, converted.fixed_input(size))
    reference = np.asarray(out.get("logits", out["pooled"]))
    leaves = {k: np.asarray(v) for k, v in abstract_leaves(model).items()}
    manifest = {
        "name": args.model,
        "arch_kwargs": kwargs,
        "source": str(args.checkpoint or "pretrained"),
        "source_sha256": model.weights_id.removeprefix("sha256:"),
        "num_leaves": len(leaves),
        "reference_input": {"size": size, "batch": 2, "seed": 0},
        "reference_output": "logits" if "logits" in out else "pooled",
        "reference_values": reference.tolist(),
        "environment": environment_info(),
    }
    path = converted.save(args.out, leaves, manifest)
    reloaded = backbones.create(args.model, weights=path, **kwargs)
    again = np.asarray(backbones.forward(reloaded, converted.fixed_input(size))[manifest["reference_output"]])
    if not np.array_equal(again, reference):
        print(f"error: the reloaded checkpoint does not reproduce the recorded outputs ({path})", file=sys.stderr)
        return 1
    print(json.dumps({k: v for k, v in manifest.items() if k not in ("reference_values", "environment")}, indent=2))
    print(f"wrote {path}; load it with bob_jax.backbones.create({args.model!r}, weights={str(path)!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
