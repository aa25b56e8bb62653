"""Ray job: `pathloop finetune`, the same code path (see pathloop.jobs).

    ray job submit --working-dir . -- \
        python jobs/finetune.py --config jobs/configs/finetune.tiny.yaml [key=value ...]
"""

from pathloop.jobs import main

if __name__ == "__main__":
    main("finetune")
