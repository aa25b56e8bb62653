"""Ray job: `pathloop guidance-classifier`, the same code path (see pathloop.jobs).

    ray job submit --working-dir . -- \
        python jobs/guidance_classifier.py --config jobs/configs/guidance.tiny.yaml [key=value ...]
"""

from pathloop.jobs import main

if __name__ == "__main__":
    main("guidance-classifier")
