"""Ray job entry point for the sweep; the same arguments as ``shortened sweep``.

    ray job submit --working-dir . -- python jobs/sweep.py jobs/configs/llama3-8b.yaml --storage-path /mnt/shared/runs
"""

import sys

from shortened.cli import main

if __name__ == "__main__":
    sys.exit(main(["sweep", *sys.argv[1:]]))
