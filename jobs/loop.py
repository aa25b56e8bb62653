"""Ray job: `loop`, the same code path as `pathloop loop`.

    ray job submit --working-dir . -- \
        python jobs/loop.py --config jobs/configs/loop.tiny.yaml workdir=$PATHLOOP_STORAGE/loop
"""

from pathloop.jobs import main

if __name__ == "__main__":
    main("loop")
