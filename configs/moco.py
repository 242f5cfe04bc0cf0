r"""Phase 1: margin-MoCo v2 pretraining (the teacher of Phase 2).

    python -m dvp_jax.main --config=configs/moco.py:digits --workdir=runs/moco_digits

Presets (after the colon):
  digits    (default) the embedded scikit-learn digits: 50 train images per class, 16 px,
            ResNet-18 at width 0.25 with the small-image stem, m = 0.99, lr 0.06 (tuned on
            val); minutes on a laptop CPU.
  runlocal  a smoke test: a few steps on tiny synthetic images.
  vipriors  the paper's run: ResNet-50, 224 px, K = 4096, T = 0.2, margin 0.4, batch 256,
            800 epochs, on the VIPriors folder (override --config.input.source=folder:PATH);
            the views are made on the accelerators (input.augment_on='device').

Paper vs MoCo: K = 4096 is the paper's queue (MoCo's default is 65536); margin 0.4 is the
released code's default (margin 0 is plain MoCo v2). Shuffle BN: 'split' (default; the key
batch is permuted, BN statistics per group of the batch, groups = data shards unless
moco.bn_groups is set; MoCo's CIFAR demo uses 8 groups on one device), 'sync' (global BN,
no shuffle), 'none' (BN per group without the shuffle: the leaky ablation).
"""
import ml_collections

from dvp_jax import config_base


def get_config(arg: str = "digits") -> ml_collections.ConfigDict:
    config = config_base.base_config("moco")
    config.moco = config_base.moco_config()
    config.knn = config_base.knn_config()
    config.optim = config_base.optim_config(base_lr=0.03, weight_decay=1e-4)
    preset = arg or "digits"
    if preset == "digits":
        config_base.digits_data_and_model(config)
        # K < one epoch of keys (500 images / 64 = 7 steps = 448 keys): a queue spanning
        # more than an epoch holds older keys of the query's own image as negatives.
        config.moco.queue_size = 384
        config.moco.projection_dims = (512, 128)
        # Tuned on val (k-NN top-1 after 60 epochs, 16 px): m = 0.999 / lr 0.03 gave 55.2,
        # m = 0.99 / lr 0.06 gave 72.0 (71.8 already at epoch 20). The paper's 0.999 suits
        # its ~156k steps; 420 steps need a faster-moving key encoder.
        config.moco.momentum = 0.99
        config.optim.base_lr = 0.06
        config.num_epochs = 60.0
        config.loop.checkpoint_every_steps = 200
        config.loop.log_every_steps = 20
        config.loop.eval_every_epochs = 20.0
    elif preset == "runlocal":
        config_base.runlocal_data_and_model(config)
        config.moco.queue_size = 64
        config.moco.projection_dims = (32, 16)
        config.knn.k = 10
    elif preset == "vipriors":
        config.input.source = "folder:data/vipriors"
        config.input.augment_on = "device"  # Two 224 px views per image, made on the GPUs.
        config.model.dtype = "bfloat16"  # Accelerator runs: bf16 compute, fp32 params/BN/losses.
        config.input.image_size = 224
        config.model.name = "resnet50"
        config.batch_size = 256
        config.moco.queue_size = 4096
        config.num_epochs = 800.0
        config.loop.checkpoint_every_steps = 2000
        config.loop.log_every_steps = 100
        config.loop.eval_every_epochs = 20.0
    else:
        raise ValueError(f"Unknown preset {preset!r} for configs/moco.py; "
                         "allowed: digits, runlocal, vipriors.")
    return config
