"""The allowed values of every config key that takes one of a fixed set: defined here once.

A leaf module (imports nothing of dvp_jax): ``config_checks`` validates configs against these
sets before any work, and the libraries that act on a value (trainers, models, optim, input)
import the same tuples, so a new value is added in one place.
"""

DTYPES = ("float32", "bfloat16")  # model.dtype: compute dtype (params stay float32).
SCHEDULES = ("cosine", "step", "constant", "seed_epoch_cosine")  # optim.schedule
MODEL_VARIANTS = ("torchvision", "seed_distill")  # model.variant (MobileNetV3 / EfficientNet)
AUTO_AUGMENT = ("", "imagenet", "cifar10", "cifar10_released")  # input.auto_augment ('' = off)
AUGMENT_ON = ("host", "device")  # input.augment_on: where the random views are made
KNN_FEATURES = ("pooled", "projection")  # knn.feature
SHUFFLE_BN_MODES = ("split", "sync", "none")  # moco.shuffle_bn
# seed_distill.augmentation -> the batch key both networks see.
SEED_DISTILL_AUGMENTATIONS = {"moco_v2": "view1", "train_crop_flip": "image"}
DISTILL_KINDS = ("l2", "l2_relative", "ofd")  # distill.kind
DISTILL_TEACHER_BN = ("eval", "train")  # distill.teacher_bn
DISTILL_STUDENT_INIT = ("teacher", "random")  # distill.student_init
CLASSIFY_TRAINERS = ("supervised", "linear", "finetune")  # trainers/classify.py's trainers
