"""Converts a PyTorch checkpoint (torchvision, MoCo, SEED, DVP student) into a dvp_jax
checkpoint directory (Orbax, see ``dvp_jax.checkpoints``), readable by every evaluator and by
Phase 2.

    python -m dvp_jax.convert_torch --torch moco_v2_800ep.pth.tar --arch resnet50 --out /tmp/moco_r50
    python -m dvp_jax.convert_torch --torch r18.pth --arch resnet18 --out DIR --num_classes 1000

Needs torch (``pip install -e .[torch]``). The key prefix ('module.encoder_q.', 'module.student.',
...) is detected unless --prefix names it ('' for none).
"""
from __future__ import annotations

import argparse
import json
import sys

from dvp_jax import console
from dvp_jax.models import NAMES
from dvp_jax.models.torch_weights import ConversionError, convert_checkpoint


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dvp_jax.convert_torch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--torch", required=True, help="PyTorch checkpoint file (.pth, .pth.tar)")
    parser.add_argument("--arch", required=True, choices=NAMES)
    parser.add_argument("--out", required=True, help="output checkpoint directory (new)")
    parser.add_argument("--num_classes", type=int, default=None,
                        help="default: keep the checkpoint's classifier (if any); N>0: require N "
                             "outputs, or add a fresh N-way classifier if it has none; 0: drop it")
    parser.add_argument("--prefix", default="auto",
                        help="key prefix of the backbone, e.g. 'module.encoder_q.' ('auto')")
    parser.add_argument("--allow_pickle", action="store_true",
                        help="torch.load(weights_only=False): for trusted files that hold more "
                             "than tensors and plain containers")
    console.add_verbosity_argument(parser)
    args = parser.parse_args(argv)
    console.setup(args.verbosity)
    try:
        meta = convert_checkpoint(args.torch, args.arch, args.out, num_classes=args.num_classes,
                                  prefix=args.prefix, allow_pickle=args.allow_pickle)
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"Converted {args.torch} (prefix {meta['prefix']!r}) -> {args.out}")
    print(json.dumps(meta["model"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
