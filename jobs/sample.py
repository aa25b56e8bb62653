"""Ray job: `sample`, the same code path as `pathloop sample`.

    ray job submit --working-dir . -- \
        python jobs/sample.py --config jobs/configs/sample.tiny.yaml [key=value ...]
"""

import sys

from pathloop.cli import app

if __name__ == "__main__":
    app(["sample", *sys.argv[1:]])
