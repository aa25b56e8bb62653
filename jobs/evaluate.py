"""Ray job: `evaluate`, the same code path as `pathloop evaluate`.

    ray job submit --working-dir . -- \
        python jobs/evaluate.py --config jobs/configs/evaluate.tiny.yaml \
        --model runs/finetune-tiny/result.json --baseline runs/pretrain-tiny/result.json
"""

import sys

from pathloop.cli import app

if __name__ == "__main__":
    app(["evaluate", *sys.argv[1:]])
