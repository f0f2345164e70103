"""torchrun worker for tests/test_preload.py: writes what this rank sees to OUT_DIR/rank<RANK>.json, then
ends as ``HYBRIDQUANT_PROBE_END`` says (an exit code, ``kill`` or ``sleep``).

    torchrun --nproc_per_node=N tests/workers/preload_probe.py OUT_DIR [ARGS...]
"""

import json
import os
import random
import signal
import sys
import time
from pathlib import Path

seen = {
    "argv": sys.argv,
    "cwd": os.getcwd(),
    "path0": sys.path[0],
    "main": sys.modules["__main__"].__file__,
    "env": {k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "HYBRIDQUANT_PROBE")},
    "hash": hash("nemotron"),
    "random": random.random(),
    "preloaded": "modelopt.torch.quantization" in sys.modules,
    "pid": os.getpid(),
}
out = Path(sys.argv[1]) / f"rank{os.environ['RANK']}.json"
out.write_text(json.dumps(seen))
print(f"rank {os.environ['RANK']} wrote {out.name}", flush=True)
ends = os.environ.get("HYBRIDQUANT_PROBE_END", "0").split(",")  # one per rank, or one for all
end = ends[int(os.environ["RANK"]) % len(ends)]
if end == "kill":
    os.kill(os.getpid(), signal.SIGKILL)
if end == "sleep":
    time.sleep(10**6)
sys.exit(int(end))
