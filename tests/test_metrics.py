"""Top-k and weighted k-NN against brute-force numpy."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dvp_jax import metrics, sharding


def test_topk_matches_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(50, 12))
    labels = rng.integers(0, 12, size=50)
    got = metrics.topk_correct(logits, labels, ks=(1, 5))
    rank = (logits > logits[np.arange(50), labels][:, None]).sum(-1)
    np.testing.assert_array_equal(np.asarray(got[1]), rank < 1)
    np.testing.assert_array_equal(np.asarray(got[5]), rank < 5)


def _knn_reference(query, bank, bank_labels, num_classes, k, t):
    """Brute-force numpy weighted k-NN (float64)."""
    bn = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    qn = query / np.linalg.norm(query, axis=1, keepdims=True)
    ref = np.zeros((len(query), num_classes))
    for i in range(len(query)):
        sim = bn @ qn[i]
        for j in np.argsort(-sim)[:k]:
            ref[i, bank_labels[j]] += np.exp(sim[j] / t)
    return ref


@pytest.mark.parametrize("devices", [1, 4])
def test_weighted_knn_matches_brute_force(devices, monkeypatch):
    """41 bank rows over 4 devices (padding rows), k=15 > rows per device (merge across
    devices), and a similarity budget small enough to force several query chunks."""
    monkeypatch.setattr(metrics, "SIMILARITY_BUDGET_BYTES", 4 * 11 * 4)  # 4 queries per chunk.
    rng = np.random.default_rng(1)
    bank = rng.normal(size=(41, 6))
    bank_labels = rng.integers(0, 4, size=41)
    query = rng.normal(size=(9, 6))
    k, t = 15, 0.1
    mesh = sharding.make_mesh(jax.devices()[:devices])
    scores = metrics.weighted_knn_scores(query, bank, bank_labels, num_classes=4, k=k,
                                         temperature=t, mesh=mesh)
    ref = _knn_reference(query, bank, bank_labels, 4, k, t)
    np.testing.assert_allclose(scores, ref, rtol=1e-4)
    acc = metrics.accuracy_from_scores(scores, np.argmax(ref, 1), ks=(1,))
    assert acc["top1"] == 100.0


def test_sharded_knn_memory_per_device_is_bank_over_devices():
    """Compiled per-device sizes (XLA's memory analysis of the partitioned program): the bank
    arguments and the similarity temporaries shrink 4x from 1 to 4 devices."""
    rng = np.random.default_rng(2)
    n, d, q = 4000, 64, 256
    bank = rng.normal(size=(n, d)).astype(np.float32)
    labels = rng.integers(0, 10, n).astype(np.int32)
    sizes = {}
    for devices in (1, 4):
        mesh = sharding.make_mesh(jax.devices()[:devices])
        data = sharding.batch_sharded(mesh)
        b, l = jax.device_put(bank, data), jax.device_put(labels, data)
        assert {s.data.shape[0] for s in b.addressable_shards} == {n // devices}
        fn = metrics._sharded_knn_fn(mesh, 20, 10)
        query = sharding.put_replicated(np.zeros((q, d), np.float32), mesh)
        sizes[devices] = fn.lower(query, b, l, jnp.float32(0.1)).compile().memory_analysis()
    bank_bytes, query_bytes = bank.nbytes + labels.nbytes, q * d * 4
    assert sizes[1].argument_size_in_bytes >= bank_bytes
    assert sizes[4].argument_size_in_bytes <= bank_bytes / 4 + query_bytes + 1024
    sim_bytes = q * n * 4
    assert sizes[1].temp_size_in_bytes >= sim_bytes
    assert sizes[4].temp_size_in_bytes <= sim_bytes / 4 * 1.2


def test_extracted_bank_stays_sharded_and_gives_the_unsharded_knn():
    """A bank extracted on 4 devices (37 synthetic examples, batches of 8: padding rows) holds
    a quarter of the rows per device and scores like brute force on the gathered features."""
    from dvp_jax import config_base, features
    from dvp_jax.input import pipeline
    config = config_base.input_config("synthetic", image_size=8)
    config.synthetic_num_examples, config.synthetic_num_classes = 37, 5
    mesh = sharding.make_mesh()
    assert sharding.num_data_shards(mesh) == 4

    def predict(variables, images):
        return images.reshape((images.shape[0], -1))[:, :24] * variables["scale"]

    def batches(split):
        return pipeline.make_eval_iterator(config, split, "eval_center", global_batch=8,
                                           image_size=8)

    variables = {"scale": jnp.float32(2.0)}
    bank = features.extract_bank(predict, variables, batches("train"), mesh, 37)
    assert bank.size == 37 and bank.features.shape == (40, 24)
    assert {s.data.shape for s in bank.features.addressable_shards} == {(10, 24)}
    assert int(np.sum(np.asarray(bank.labels) < 0)) == 3
    host_bank, host_labels = features.extract(predict, variables, batches("train"), mesh)
    query, labels = features.extract(predict, variables, batches("val"), mesh)
    scores = metrics.sharded_knn_scores(query, bank, num_classes=5, k=10, temperature=0.1)
    ref = _knn_reference(query, host_bank, host_labels, 5, 10, 0.1)
    np.testing.assert_allclose(scores, ref, rtol=1e-4)
