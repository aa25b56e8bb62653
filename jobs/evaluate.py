"""Ray job: `pathloop evaluate`, the same code path (see pathloop.jobs).

    ray job submit --working-dir . -- \
        python jobs/evaluate.py --config jobs/configs/evaluate.tiny.yaml \
        --model /shared/runs/finetune-tiny/result.json \
        --baseline /shared/runs/pretrain-tiny/result.json workdir=/shared/runs/evaluate-tiny
"""

from pathloop.jobs import main

if __name__ == "__main__":
    main("evaluate")
