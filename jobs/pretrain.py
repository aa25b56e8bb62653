"""Ray job: `pretrain`, the same code path as `pathloop pretrain`.

    ray job submit --working-dir . -- \
        python jobs/pretrain.py --config jobs/configs/pretrain.tiny.yaml [key=value ...]
"""

import sys

from pathloop.cli import app

if __name__ == "__main__":
    app(["pretrain", *sys.argv[1:]])
