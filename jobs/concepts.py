"""Ray job: `pathloop concepts`, the same code path (see pathloop.jobs).

    ray job submit --working-dir . -- \
        python jobs/concepts.py --config jobs/configs/concepts.tiny.yaml [key=value ...]
"""

from pathloop.jobs import main

if __name__ == "__main__":
    main("concepts")
