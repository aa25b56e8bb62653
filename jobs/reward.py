"""Ray job: `pathloop reward`, the same code path (see pathloop.jobs).

    ray job submit --working-dir . -- \
        python jobs/reward.py --config jobs/configs/reward.tiny.yaml [key=value ...]
"""

from pathloop.jobs import main

if __name__ == "__main__":
    main("reward")
