"""One process of the 2-process start-up safety job (tests/test_multihost_sync.py).

    python tests/multihost_sync_worker.py --coordinator_address=127.0.0.1:PORT --process_id=I \
        --out=FILE.json

Joins a 2-process job (gloo), then: (1) check_agreement on equal parts, twice under one
name (must pass);
(2) check_agreement where process 1 sees one more training example (must fail on both,
naming process 1); (3) process 0 waits at a barrier process 1 never reaches (timeout 2 s),
while process 1 sleeps 4 s. Writes {'agree_ok', 'disagree', 'timeout', 'timeout_s'} to FILE.
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--coordinator_address", required=True)
    parser.add_argument("--process_id", type=int, required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=args.coordinator_address, num_processes=2,
                               process_id=args.process_id, initialization_timeout=60)
    from dvp_jax import distributed
    pid = jax.process_index()
    result = {}
    distributed.check_agreement("same", {"config": {"lr": 0.1}, "sizes": {"train": 100}},
                                timeout_s=60)
    distributed.check_agreement("same", {"config": {"lr": 0.1}}, timeout_s=60)  # Reusable name.
    result["agree_ok"] = True
    try:
        distributed.check_agreement("sizes", {"config": {"lr": 0.1},
                                              "data set sizes": {"train": 100 + pid}}, timeout_s=60)
    except distributed.DistributedError as e:
        result["disagree"] = str(e)
    if pid == 0:
        start = time.time()
        try:
            distributed.barrier("never", timeout_s=2)
        except distributed.DistributedError as e:
            result["timeout"] = str(e)
        result["timeout_s"] = time.time() - start
    else:
        time.sleep(4)
    with open(args.out, "w") as f:
        json.dump(result, f)
    print(f"process {pid} wrote {args.out}", flush=True)


if __name__ == "__main__":
    main()
