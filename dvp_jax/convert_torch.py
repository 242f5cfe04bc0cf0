"""Converts a PyTorch checkpoint (torchvision, MoCo, SEED, DVP student) into a dvp_jax
checkpoint directory (Orbax, see ``dvp_jax.checkpoints``), readable by every evaluator and by
Phase 2.

    python -m dvp_jax.convert_torch --torch moco_v2_800ep.pth.tar --arch resnet50 --out /tmp/moco_r50
    python -m dvp_jax.convert_torch --torch r18.pth --arch resnet18 --out DIR --num_classes 1000

Needs torch (``pip install -e .[torch]``). The key prefix ('module.encoder_q.', 'module.student.',
...) is detected unless --prefix names it ('' for none).
"""
from __future__ import annotations

import json
import sys

from absl import flags

from dvp_jax import cli, console
from dvp_jax.models import NAMES
from dvp_jax.models.torch_weights import convert_checkpoint

PROG = "python -m dvp_jax.convert_torch"
FLAGS = flags.FlagValues()
flags.DEFINE_string("torch", None, "PyTorch checkpoint file (.pth, .pth.tar)", flag_values=FLAGS,
                    required=True)
flags.DEFINE_enum("arch", None, NAMES, "the architecture", flag_values=FLAGS, required=True)
flags.DEFINE_string("out", None, "output checkpoint directory (new)", flag_values=FLAGS,
                    required=True)
flags.DEFINE_integer("num_classes", None,
                     "default: keep the checkpoint's classifier (if any); N>0: require N outputs, "
                     "or add a fresh N-way classifier if it has none; 0: drop it", flag_values=FLAGS)
flags.DEFINE_string("prefix", "auto", "key prefix of the backbone, e.g. 'module.encoder_q.' ('auto')",
                    flag_values=FLAGS)
flags.DEFINE_boolean("allow_pickle", False,
                     "torch.load(weights_only=False): for trusted files that hold more than "
                     "tensors and plain containers", flag_values=FLAGS)
cli.define_verbosity(FLAGS)


def _convert(args) -> int:
    meta = convert_checkpoint(args.torch, args.arch, args.out, num_classes=args.num_classes,
                              prefix=args.prefix, allow_pickle=args.allow_pickle)
    print(f"Converted {args.torch} (prefix {meta['prefix']!r}) -> {args.out}")
    print(json.dumps(meta["model"]))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Exit code: 0, or 2 after a one-line error (ConversionError and other user errors)."""
    args = cli.parse(FLAGS, argv, prog=PROG, doc=__doc__)
    console.setup(args.verbosity)
    return cli.run(lambda: _convert(args))


if __name__ == "__main__":
    sys.exit(main())
