"""Ray job: `pathloop sample`, the same code path (see pathloop.jobs).

    ray job submit --working-dir . -- \
        python jobs/sample.py --config jobs/configs/sample.tiny.yaml [key=value ...]
"""

from pathloop.jobs import main

if __name__ == "__main__":
    main("sample")
