"""Ray job: `pathloop sweep`, the same code path (see pathloop.jobs).

    ray job submit --working-dir . -- \
        python jobs/sweep.py --config jobs/configs/sweep.tiny.yaml workdir=/shared/runs/sweep-tiny
"""

from pathloop.jobs import main

if __name__ == "__main__":
    main("sweep")
