"""The cluster test needs a running SLURM (make test-cluster starts one): never part of
`make test`. It is collected only when POSTALIGN_CLUSTER_TEST=1 (set by make test-cluster)."""

import os

if os.environ.get("POSTALIGN_CLUSTER_TEST") != "1":
    collect_ignore_glob = ["test_*.py"]
