"""Test session setup: 4 simulated CPU devices, a persistent compilation cache, quiet TF.

Every test sees 4 CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=4), so the
sharded code paths run everywhere; tests that compare against one device build a 1-device
mesh with ``sharding.make_mesh(jax.devices()[:1])``.
"""
import os
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=4").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# Compiled programs are cached on disk: a program compiled by one test (or subprocess) is
# loaded, not recompiled, by the next. Results do not depend on it.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "dvp_jax_test_xla_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
# Caches of the code under test (folder-source checks) go to a per-session temporary folder,
# never into the user's ~/.cache.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="dvp_jax_test_cache_")
