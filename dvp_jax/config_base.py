"""Config sections shared by every experiment in configs/.

Each ``configs/*.py`` file builds its ConfigDict from these sections and adds its own
(``config.moco``, ``config.distill``, ...); the data + model settings its presets share
(digits, VIPriors, runlocal) live in ``configs/common.py``. Every key a trainer reads exists here or in its
config file, so ``--config.a.b=value`` overrides of unknown keys or wrong types are refused by
ml_collections before any work; ``dvp_jax.config_checks.validate`` then checks values.

Units: sizes in pixels, durations in epochs (floats allowed), learning rates per 256 images.
"""
from __future__ import annotations

import ml_collections

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def input_config(source: str = "digits", image_size: int = 32) -> ml_collections.ConfigDict:
    """Where images come from and how they are prepared (see dvp_jax/input/)."""
    c = ml_collections.ConfigDict()
    # 'digits' (embedded, scikit-learn) | 'synthetic' | 'tfds:NAME' | 'folder:PATH'.
    c.source = source
    c.data_dir = ""  # TFDS data_dir ('' = TFDS default).
    c.manual_dir = ""  # TFDS manual_dir (imagenet2012 needs the tarballs there).
    c.train_split = "train"
    c.eval_split = "val"
    c.test_split = "test"
    c.image_size = image_size  # Crop resolution fed to the network.
    # Embedded digits (1,797 8x8 images, 10 classes): a per-class split with a fixed seed.
    c.digits_train_per_class = 50
    c.digits_val_per_class = 50
    c.digits_test_per_class = 50
    c.split_seed = 0
    c.digits_image_size = 32  # Digits are upsampled bilinearly from 8x8 to this many pixels.
    # Synthetic: deterministic random images and labels.
    c.synthetic_num_examples = 256
    c.synthetic_num_classes = 10
    c.synthetic_image_size = 0  # Side of the synthetic images in pixels; 0 = image_size.
    # TFDS sources: feature names of the encoded image and the integer label.
    c.tfds_image_key = "image"
    c.tfds_label_key = "label"
    # Folder sources: a corrupt or non-image file is skipped and counted, or stops the run.
    c.strict = False
    # Up-front check of folder sources: 'cached' checks every file once, in parallel, and
    # remembers the result in the user cache dir ($XDG_CACHE_HOME/dvp_jax, never in PATH) |
    # 'decode' (every start, nothing written) | 'none' (lazy: unreadable files are dropped by
    # tf.data at run time). Skipped files are counted and reported either way.
    c.folder_validate = "cached"
    # Decompression bombs: images over this many pixels (by their header) are skipped and
    # counted, never decoded. 40 M pixels = 120 MB decoded RGB, far above ordinary photos.
    c.max_image_pixels = 40_000_000
    c.threadpool_size = 0  # tf.data private threads per pipeline; 0 = TF default (one per core).
    # Where the train views are made: 'host' (tf.data on the CPUs: decode, crop, jitter, blur)
    # or 'device' (the host decodes and stores the centre square at round(image_size / crop_ratio)
    # px as uint8;
    # the accelerators crop, jitter and blur inside the train step: dvp_jax/input/device_augment.py).
    c.augment_on = "host"
    c.resize_antialias = True  # Antialiased bilinear resize in random crops (PIL-like); False is faster.
    c.crop_ratio = 0.875  # Eval: resize the shorter side to round(image_size / crop_ratio), crop;
    # augment_on='device': the side of the stored squares.
    c.shuffle_buffer = 50_000
    c.prefetch = 2  # Batches prefetched onto the devices.
    c.mean = IMAGENET_MEAN
    c.std = IMAGENET_STD
    # MoCo v2 views ('moco_v2' transform): RandomResizedCrop area scale range, probability of a
    # horizontal flip, probability of the Gaussian blur (sigma ~ U(0.1, 2.0) pixels), colour
    # jitter probability. Defaults are MoCo v2's ImageNet "aug-plus".
    c.moco_crop_scale = (0.2, 1.0)
    c.moco_flip_prob = 0.5
    c.moco_blur_prob = 0.5
    c.moco_jitter_prob = 0.8
    # Train-time extras (classification / distillation).
    # '' | 'imagenet' | 'cifar10' (torchvision's policies) | 'cifar10_released' (the DVP code
    # release's variant: magnitudes uniform inside each bin, bicubic, black fill).
    c.auto_augment = ""
    # Side of the Cutout square in pixels, filled with the image's mean grey; 0 = off. The DVP
    # release's --cutout uses image_size // 4 (56 at 224 px).
    c.cutout = 0
    # TFDS data-deficient splits (VIPriors style). > 0: 'train' and 'val' are this many and
    # tfds_val_per_class images per class, disjoint, carved from the TFDS 'train' split with
    # numpy RNG(split_seed); 'test' is the TFDS 'test' split ('validation' if none) in full.
    # 0 = use the TFDS splits as they are.
    c.tfds_train_per_class = 0
    c.tfds_val_per_class = 0  # Val images per class when tfds_train_per_class > 0.
    return c


def model_config(name: str = "resnet18") -> ml_collections.ConfigDict:
    """Backbone options passed to ``dvp_jax.models.build``."""
    c = ml_collections.ConfigDict()
    c.name = name
    c.width_multiplier = 1.0
    c.small_stem = False  # 3x3 stride-1 stem, no max-pool: for 32-64 px inputs.
    c.dtype = "float32"  # Compute dtype: 'float32' | 'bfloat16' (params and BN stats stay fp32).
    c.zero_init_residual = False
    # 'torchvision' | 'seed': SEED's own MobileNetV3-Large / EfficientNet-B0 definitions (BN
    # settings, layer order, padding, dropout; see dvp_jax/models/). ResNets: no difference.
    c.variant = "torchvision"
    return c


def optim_config(base_lr: float, weight_decay: float = 1e-4) -> ml_collections.ConfigDict:
    """SGD with momentum; lr = base_lr * global_batch / 256 following ``schedule``."""
    c = ml_collections.ConfigDict()
    c.base_lr = base_lr
    c.momentum = 0.9
    c.nesterov = False
    c.weight_decay = weight_decay
    c.exclude_bn_and_bias_from_wd = False
    # 'cosine' | 'step' | 'constant' | 'seed_epoch_cosine' (SEED's code: per epoch, warm-up
    # from base_lr to the scaled lr, then a cosine over all num_epochs; see dvp_jax/optim.py).
    c.schedule = "cosine"
    c.warmup_epochs = 0.0
    c.decay_epochs = (30.0, 60.0, 90.0)  # For 'step': multiply by decay_factor at each.
    c.decay_factor = 0.1
    return c


def loop_config() -> ml_collections.ConfigDict:
    """The shared training loop (dvp_jax/loop.py): checkpoints, logs, evaluation."""
    c = ml_collections.ConfigDict()
    c.checkpoint_every_steps = 500
    c.keep_checkpoints = 3
    c.log_every_steps = 50  # Metrics are fetched from the devices only this often.
    c.eval_every_epochs = 10.0  # Periodic evaluation (k-NN monitor / val accuracy); 0 = end only.
    c.allow_config_change = False  # Resume a workdir whose saved config differs (named keys).
    return c


def moco_config() -> ml_collections.ConfigDict:
    """Phase 1 (configs/moco.py): margin-MoCo v2 hyper-parameters."""
    c = ml_collections.ConfigDict()
    # MLP head Dense(d0) -> ReLU -> Dense(d1), no BN; 0 = the backbone's feature width C (the
    # reference: Linear(C, C) -> ReLU -> Linear(C, 128), C = 512 for ResNet-18, 2048 for -50).
    c.projection_dims = (0, 128)
    c.queue_size = 4096  # K; a multiple of the global batch.
    c.temperature = 0.2
    c.margin = 0.4  # Subtracted from the positive logit before /T; 0 = MoCo v2.
    c.margin_warmup_epochs = 0.0  # Margin ramps linearly 0 -> margin over these epochs; 0 = off.
    # True: a query's negatives skip queue keys of its own image (older views of it). MoCo
    # assumes K << the number of images; on small data sets (K ~ N) they are frequent.
    c.exclude_own_keys = False
    c.momentum = 0.999  # EMA of the key encoder.
    c.momentum_cosine = False  # Ramp m to 1 with a half cosine over training.
    c.shuffle_bn = "split"  # 'split' | 'sync' | 'none'.
    # 0 = auto: one group per data shard; on a single shard MoCo's single-GPU recipe of 8
    # groups (fewer if the batch is too small, logged).
    c.bn_groups = 0
    return c


def knn_config() -> ml_collections.ConfigDict:
    """The weighted k-NN monitor (MoCo's CIFAR demo)."""
    c = ml_collections.ConfigDict()
    c.enabled = True  # Weighted k-NN monitor on input.eval_split every loop.eval_every_epochs.
    c.k = 200
    c.temperature = 0.1
    c.feature = "pooled"  # 'pooled' backbone feature | 'projection' (MoCo demo's 128-d output).
    return c


def base_config(trainer: str) -> ml_collections.ConfigDict:
    """The top level every config shares."""
    c = ml_collections.ConfigDict()
    c.trainer = trainer
    c.seed = 0
    c.batch_size = 256  # Global batch over all devices and processes.
    c.num_epochs = 100.0
    c.input = input_config()
    c.model = model_config()
    c.loop = loop_config()
    return c
