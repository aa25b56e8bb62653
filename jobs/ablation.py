"""Ray job: `pathloop ablation`, the same code path (see pathloop.jobs).

    ray job submit --working-dir . -- \
        python jobs/ablation.py --config jobs/configs/ablation.tiny.yaml \
        workdir=/shared/runs/ablation-tiny
"""

from pathloop.jobs import main

if __name__ == "__main__":
    main("ablation")
