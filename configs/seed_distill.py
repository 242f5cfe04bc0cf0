r"""SEED: self-supervised distillation of a frozen SSL teacher into a smaller student.

    python -m dvp_jax.main --config=configs/seed_distill.py:digits --workdir=runs/seed_digits \
        --config.seed_distill.teacher_checkpoint=runs/moco_digits/checkpoints

The teacher is any checkpoint with a projection head: a Phase-1 run (configs/moco.py, its
WORKDIR/checkpoints) or an SSL encoder converted with ``python -m dvp_jax.convert_torch``. For the
digits preset, train the teacher first:

    python -m dvp_jax.main --config=configs/moco.py:digits --workdir=runs/moco_digits

Then read the student out (linear readout, or full finetuning), starting from this run's
checkpoint (its state holds the student's {'backbone', 'projection'}; the head is dropped). The
classify presets must describe the same student: pass the preset's --config.model.* values
(digits: width 0.0625, where classify's digits presets use 0.125):

    python -m dvp_jax.main --config=configs/classify.py:linear_digits \
        --workdir=runs/seed_digits_linear --config.model.width_multiplier=0.0625 \
        --config.classify.init_checkpoint=runs/seed_digits/checkpoints
    python -m dvp_jax.main --config=configs/classify.py:finetune_digits \
        --workdir=runs/seed_digits_finetune --config.model.width_multiplier=0.0625 \
        --config.classify.init_checkpoint=runs/seed_digits/checkpoints

Measured with the former 16-px digits presets (student 0.125, teacher 0.25) and the earlier
per-step cosine schedule (not rerun since the digits presets moved to 32 px and SEED's per-epoch
schedule): student k-NN 61.4 vs teacher 57.6 (the default configs/moco.py:digits teacher);
linear readout of the student 65.6 vs 60.2 for the teacher. A MobileNetV3 / EfficientNet student
is read out with the same --config.model.variant=seed_distill as its SEED run (the readout refuses a
mismatch).

Presets (after the colon):
  digits    (default) the embedded digits at 32 px; student ResNet-18 at width 0.0625 with the
            small-image stem, distilled from the digits MoCo teacher (ResNet-18, width 0.125);
            K = 1024, batch 64, 40 epochs (280 steps); 2-3 minutes on 2 CPU cores.
  runlocal  a smoke test: a few steps on 16-px synthetic images; the teacher is a
            configs/moco.py:runlocal checkpoint.
  imagenet  the SEED paper's run: ResNet-50 MoCo-v2 teacher -> ResNet-18 student, ImageNet
            (tfds:imagenet2012), 224 px, batch 256, K = 65536, 200 epochs; k-NN at the end only.

Method (docs/METHOD.md, SEED): the teacher (backbone + MLP head, BN in inference mode,
never updated) and the student see the SAME augmented view; t = normalise(teacher
projection), s = normalise(student projection); a queue of K teacher embeddings;
loss = CE(softmax([t.t, t.queue] / tau_T), softmax([s.t, s.queue] / tau_S)); then t is enqueued.

Paper vs released code (jacobswan1/SEED):
  teacher_temperature: 0.01 here = the paper's best ablation; the code's default is 1e-4.
  student_temperature: 0.2 in both.
  hidden_dim: 0 = the student backbone's feature dim C (the code's head Linear(C, C) -> ReLU ->
      Linear(C, 128): 512 for ResNet-18/34, 1280 for MobileNet-v3-Large / EfficientNet-B0).
  augmentation: 'moco_v2' (MoCo v2's aug-plus on ONE view, as the code's ``mocov2_aug``): the
      input pipeline's 'moco_v2' transform is used and only its 'view1' is fed (view2 is
      ignored: the host makes it for nothing; its cost is small next to the two forward
      passes). 'train_crop_flip' uses the classification crop+flip ('image').
  schedule: optim.schedule='seed_epoch_cosine', the code's: the lr is set once per epoch;
      for epochs e < 5 it goes linearly from base_lr to base_lr * batch / 256 (constant at
      batch 256; DOWNWARDS below it), then base_lr * batch / 256 * (1 + cos(pi e / 200)) / 2,
      a cosine over all the epochs, warm-up included. ('cosine' with warmup_epochs = 5 is the
      per-step variant warming up from 0.)
  students: model.variant='seed_distill' builds SEED's own MobileNetV3-Large / EfficientNet-B0
      (dvp_jax/models/); 'torchvision' gives torchvision's. ResNets are the same in both.
  BN of the student: one group over the global batch
      (bn_groups = 1; no positive pair inside the batch, so no shuffle BN is needed); 0 = one
      group per data shard, as the code's per-GPU BN.
"""
import ml_collections

from configs import common
from dvp_jax import config_base


def seed_section() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.teacher_checkpoint = ""  # Checkpoint directory (WORKDIR/checkpoints) with a projection head.
    c.teacher_step = -1  # Which step of it; -1 = the latest (pin it if the teacher still trains).
    c.hidden_dim = 0  # Student head Dense(hidden) -> ReLU -> Dense(teacher dim); 0 = backbone dim.
    c.queue_size = 65536  # K teacher embeddings; a multiple of the global batch.
    c.student_temperature = 0.2  # tau_S.
    c.teacher_temperature = 0.01  # tau_T: paper's best ablation; released code default 1e-4.
    c.augmentation = "moco_v2"  # 'moco_v2' (its view1) | 'train_crop_flip'.
    c.bn_groups = 1  # Student BN groups; 0 = one per data shard (per-device BN).
    return c


def knn_section() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.enabled = True  # Weighted k-NN of the student on input.eval_split (loop.eval_every_epochs).
    c.k = 200
    c.temperature = 0.1
    c.feature = "pooled"  # 'pooled' backbone feature | 'projection' (the 128-d head output).
    c.teacher = True  # Also report the teacher's k-NN (computed once, at the first evaluation).
    return c


def base() -> ml_collections.ConfigDict:
    """SEED's recipe: SGD lr 0.03 per 256, per-epoch cosine after 5 warm-up epochs, 200 epochs,
    SEED's own student definitions."""
    config = config_base.base_config("seed_distill")
    config.seed_distill = seed_section()
    config.knn = knn_section()
    config.optim = config_base.optim_config(base_lr=0.03, weight_decay=1e-4)
    config.optim.schedule = "seed_epoch_cosine"  # SEED's adjust_learning_rate (per epoch).
    config.optim.warmup_epochs = 5.0
    config.num_epochs = 200.0
    config.model.variant = "seed_distill"  # SEED's MobileNetV3 / EfficientNet-B0 (ResNets: same).
    return config


def digits() -> ml_collections.ConfigDict:
    config = base()
    common.digits_data_and_model(config)
    config.model.width_multiplier = common.DIGITS_WIDTH / 2  # Half the teacher's width.
    config.seed_distill.queue_size = 1024
    config.num_epochs = 40.0
    config.loop.checkpoint_every_steps = 200
    config.loop.log_every_steps = 20
    config.loop.eval_every_epochs = 20.0
    return config


def runlocal() -> ml_collections.ConfigDict:
    config = base()
    common.runlocal_data_and_model(config)
    config.seed_distill.queue_size = 64
    config.seed_distill.hidden_dim = 32
    config.knn.k = 10
    config.optim.warmup_epochs = 1.0
    return config


def imagenet() -> ml_collections.ConfigDict:
    config = base()
    config.input.source = "tfds:imagenet2012"
    config.model.dtype = "bfloat16"  # Accelerator runs: bf16 compute, fp32 params/BN/losses.
    config.input.eval_split = "validation"
    config.input.image_size = 224
    config.model.name = "resnet18"
    config.batch_size = 256
    config.seed_distill.queue_size = 65536
    config.num_epochs = 200.0
    config.knn.teacher = False
    config.loop.checkpoint_every_steps = 2000
    config.loop.log_every_steps = 100
    config.loop.eval_every_epochs = 0.0  # k-NN over 1.28M train images: at the end only.
    return config


PRESETS = {"digits": digits, "runlocal": runlocal, "imagenet": imagenet}


def get_config(arg: str = "digits") -> ml_collections.ConfigDict:
    return common.get_preset(PRESETS, arg, default="digits", filename="seed_distill.py")
