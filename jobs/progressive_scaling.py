"""Progressive scaling job: `python -m orchestrator scale` as a script, for `ray job submit`.

    python jobs/progressive_scaling.py --stages scale-12,scale-24 --steps-per-stage 100
    ray job submit --working-dir . -- python jobs/progressive_scaling.py --workers 4 --gpus-per-worker 1

It takes the same flags as `python -m orchestrator scale` (see orchestrator/launch/progressive.py).
"""
import sys
from pathlib import Path

# `python jobs/progressive_scaling.py` puts jobs/ on the path, not the project: add the project root,
# so the job imports the same way here and under `ray job submit --working-dir .`.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchestrator.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["scale", *sys.argv[1:]]))
