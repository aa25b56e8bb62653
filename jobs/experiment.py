"""Ray job: `experiment`, the same code path as `pathloop experiment`.

    ray job submit --working-dir . -- python jobs/experiment.py \
        --config jobs/configs/experiment.artifacts.yaml workdir=$PATHLOOP_STORAGE/experiment
"""

from pathloop.jobs import main

if __name__ == "__main__":
    main("experiment")
