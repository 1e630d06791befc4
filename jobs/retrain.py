"""Ray job entry point for retraining; the same flags as ``shortened retrain``.

    ray job submit --working-dir . -- python jobs/retrain.py --model pruned/ --method cpt \\
        --config jobs/configs/retrain-cpt.yaml --num_workers 8 --use_gpu --storage_path s3://bucket/runs \\
        --out /mnt/out
"""

import sys

from shortened.cli import main

if __name__ == "__main__":
    sys.exit(main(["retrain", *sys.argv[1:]]))
