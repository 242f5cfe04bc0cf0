r"""Classification baselines of Table 1: supervised from scratch, linear readout, full finetune.

    python -m dvp_jax.main --config=configs/classify.py:supervised_digits --workdir=runs/supervised_digits

Presets (after the colon); each sets config.trainer:
  supervised_digits (default)  random init on the embedded digits (ResNet-18 at width 0.125,
            small stem, 32 px, batch 64, as configs/moco.py:digits); about a minute on a CPU.
  linear_digits    linear readout of the Phase-1 digits run:
      python -m dvp_jax.main --config=configs/classify.py:linear_digits --workdir=runs/linear_digits
            (reads runs/moco_digits/checkpoints, written by configs/moco.py:digits; override with
            --config.classify.init_checkpoint=DIR).
  finetune_digits  full finetune of the Phase-1 digits run:
      python -m dvp_jax.main --config=configs/classify.py:finetune_digits --workdir=runs/finetune_digits
  runlocal / linear_runlocal / finetune_runlocal   smoke tests: a few steps on tiny synthetic
            images (linear / finetune read runs/moco_runlocal/checkpoints, configs/moco.py:runlocal).
  supervised / linear / finetune   the paper's runs: ResNet-50, 224 px, batch 256, 100 epochs on
            the VIPriors folder (--config.input.source=folder:PATH); linear and finetune read
            runs/moco_vipriors/checkpoints (configs/moco.py:vipriors; override
            --config.classify.init_checkpoint=DIR):
      python -m dvp_jax.main --config=configs/classify.py:finetune --workdir=runs/finetune_vipriors
  vipriors_448 / vipriors_resnext101   the paper's "tricks" resolutions / backbone applied to the
            finetune baseline: 448 px crops; ResNeXt-101 32x8d (needs a Phase-1 checkpoint of that
            backbone). The full tricks stack (label smoothing, AutoAugment, train+val) is
            configs/distill.py:vipriors_tricks.

Recipes (docs/METHOD.md):
  supervised / finetune: SGD Nesterov, lr 0.1 per 256 images, momentum 0.9, wd 1e-4, x0.1 at
      epochs 30/60/90 of 100, RandomResizedCrop(0.08..1) + flip (+ input.auto_augment /
      input.cutout), CE with optional label smoothing (classify.label_smoothing).
  linear: frozen backbone in inference mode, new linear layer ~ N(0, 0.01), bias 0, SGD lr 30
      per 256 (plain momentum 0.9, MoCo's lincls), wd 0, x0.1 at 60% and 80% of training.
Schedules: the presets set optim.decay_epochs from num_epochs (30/60/90% or 60/80%); when
overriding --config.num_epochs, override --config.optim.decay_epochs to match.
Evaluation: top-1/top-5 on input.eval_split (resize to size/0.875, centre crop) every
loop.eval_every_epochs and at the end, written to WORKDIR/eval_<split>.json (the "final"
accuracy); the best evaluation so far goes to WORKDIR/best_<split>.json ("best val epoch
(reference protocol)", what the reference code reports; it evaluates every epoch).
Options of the reference's Phase-2 script: classify.mixup_alpha (its --mixup: 1.0),
input.cutout (its --cutout: image_size // 4), input.auto_augment='cifar10_released' (its
--autoaug).
"""
import ml_collections

from configs import common
from dvp_jax import config_base

def classify_section() -> ml_collections.ConfigDict:
    c = common.classify_section()  # label_smoothing, mixup_alpha (shared with Phase 2).
    # 'finetune' / 'linear': the Phase-1 checkpoint directory (WORKDIR/checkpoints of a moco run,
    # or a converted PyTorch checkpoint); its projection head is dropped.
    c.init_checkpoint = ""
    c.init_step = -1  # Step of init_checkpoint to read; -1 = the latest.
    c.linear_init_std = 0.01  # 'linear': classifier weights ~ N(0, std^2), bias 0.
    return c


def set_recipe(config, trainer: str) -> None:
    """The optimiser and schedule of ``trainer`` (epochs and batch set by the caller)."""
    config.trainer = trainer
    if trainer == "linear":
        config.optim = config_base.optim_config(base_lr=30.0, weight_decay=0.0)
        config.optim.schedule = "step"
        config.optim.decay_epochs = (0.6 * config.num_epochs, 0.8 * config.num_epochs)
    else:
        config.optim = config_base.optim_config(base_lr=0.1, weight_decay=1e-4)
        config.optim.nesterov = True
        config.optim.schedule = "step"
        config.optim.decay_epochs = tuple(f * config.num_epochs for f in (0.3, 0.6, 0.9))


def digits_model(config) -> None:
    """configs/moco.py:digits's data and backbone (common.digits_data_and_model)."""
    common.digits_data_and_model(config)
    config.loop.checkpoint_every_steps = 200
    config.loop.log_every_steps = 20


def base() -> ml_collections.ConfigDict:
    config = config_base.base_config("supervised")
    config.classify = classify_section()
    return config


def digits_preset(trainer: str) -> ml_collections.ConfigDict:
    """'<trainer>_digits': 30 epochs on the embedded digits (configs/moco.py:digits's data)."""
    config = base()
    digits_model(config)
    # ~7 steps per epoch (500 images / 64); a CPU step of this model takes ~0.1-0.2 s.
    config.num_epochs = 30.0
    config.loop.eval_every_epochs = 10.0
    set_recipe(config, trainer)
    if trainer == "linear":
        # Chosen on val (seed 0, 20 epochs of readout on the 40-epoch configs/moco.py:digits
        # encoder, k-NN 89.0): lr 0.3 / 3 / 30 per 256 gave 76.8 / 78.8 / 79.4 - within
        # noise of each other; 30 (MoCo's lincls) dipped to 48.8 on the way (unstable), 0.3
        # was still rising. 3.0 is in between. The readout stays below the k-NN: it trains on
        # the classification crops (area 0.08-1, fragments of an 8x8 digit), the k-NN's
        # bank is the uncropped train images.
        config.optim.base_lr = 3.0
    if trainer != "supervised":
        config.classify.init_checkpoint = "runs/moco_digits/checkpoints"
    return config


def runlocal_preset(trainer: str) -> ml_collections.ConfigDict:
    """'runlocal' (supervised) / '<trainer>_runlocal': a few steps on tiny synthetic images."""
    config = base()
    common.runlocal_data_and_model(config)
    set_recipe(config, trainer)
    if trainer != "supervised":
        config.classify.init_checkpoint = "runs/moco_runlocal/checkpoints"
    return config


def vipriors_preset(trainer: str, *, image_size: int = 224,
                    model: str = "") -> ml_collections.ConfigDict:
    """The paper's runs on the VIPriors folder (ResNet-50 unless ``model``)."""
    config = base()
    common.vipriors_data_and_model(config)
    set_recipe(config, trainer)
    if trainer != "supervised":
        config.classify.init_checkpoint = "runs/moco_vipriors/checkpoints"
    if image_size != 224:
        config.input.image_size = image_size
    if model:
        config.model.name = model
        config.classify.init_checkpoint = "runs/moco_vipriors_resnext101/checkpoints"
    return config


PRESETS = {
    "supervised_digits": lambda: digits_preset("supervised"),
    "linear_digits": lambda: digits_preset("linear"),
    "finetune_digits": lambda: digits_preset("finetune"),
    "runlocal": lambda: runlocal_preset("supervised"),
    "linear_runlocal": lambda: runlocal_preset("linear"),
    "finetune_runlocal": lambda: runlocal_preset("finetune"),
    "supervised": lambda: vipriors_preset("supervised"),
    "linear": lambda: vipriors_preset("linear"),
    "finetune": lambda: vipriors_preset("finetune"),
    "vipriors_448": lambda: vipriors_preset("finetune", image_size=448),
    "vipriors_resnext101": lambda: vipriors_preset("finetune", model="resnext101_32x8d"),
}


def get_config(arg: str = "supervised_digits") -> ml_collections.ConfigDict:
    return common.get_preset(PRESETS, arg, default="supervised_digits", filename="classify.py")
