"""Ray job: `pathloop pretrain`, the same code path (see pathloop.jobs).

    ray job submit --working-dir . -- \
        python jobs/pretrain.py --config jobs/configs/pretrain.tiny.yaml [key=value ...]
"""

from pathloop.jobs import main

if __name__ == "__main__":
    main("pretrain")
