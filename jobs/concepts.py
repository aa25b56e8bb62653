"""Ray job: `concepts`, the same code path as `pathloop concepts`.

    ray job submit --working-dir . -- \
        python jobs/concepts.py --config jobs/configs/concepts.tiny.yaml [key=value ...]
"""

import sys

from pathloop.cli import app

if __name__ == "__main__":
    app(["concepts", *sys.argv[1:]])
