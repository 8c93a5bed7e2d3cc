"""Peak memory of loading a checkpoint: aiockpt's checked, memory-mapped load against
``torch.load`` (and against reading the file into memory first, as aiockpt once did).

Each contender runs in a fresh process that imports torch and aiockpt, notes its peak
RSS, loads the file, and reports how far its peak RSS rose (``VmHWM``, which counts the
file's pages too once they are mapped and touched). "then used" also sums every tensor,
which reads all of them, as training would.

    python benchmarks/load_memory.py --size-gib 1
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

CHILD = r"""
import io, json, sys, time
import torch
import aiockpt

def peak() -> int:
    # VmHWM, not ru_maxrss: ru_maxrss survives exec and would start at the parent's peak.
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024

how, path = sys.argv[1], sys.argv[2]
before = peak()
t = time.perf_counter()
if how == "torch.load":
    state = torch.load(path, weights_only=True)
elif how == "read, then torch.load from memory":
    with open(path, "rb") as f:
        state = torch.load(io.BytesIO(f.read()), weights_only=True)
else:
    state = aiockpt.load(path)
loaded = time.perf_counter() - t
after_load = peak()
total = sum(float(v.sum()) for v in state.values())
print(json.dumps({"before": before, "after_load": after_load, "after_use": peak(),
                  "load_s": loaded, "sum": total}))
"""

CONTENDERS = ["torch.load", "read, then torch.load from memory", "aiockpt.load"]


def measure(how: str, path: str) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, how, path], capture_output=True, text=True, check=True
    )
    result: dict[str, float] = json.loads(out.stdout)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gib", type=float, default=1.0)
    parser.add_argument("--dir", default=None, help="where to write the file (default: /tmp)")
    args = parser.parse_args()

    import torch

    from aiockpt.storage._local import save_file

    n = 64
    per = int(args.size_gib * 2**30) // n // 4
    state = {f"layer{i}.weight": torch.randn(per) for i in range(n)}
    tensor_bytes = sum(t.numel() * t.element_size() for t in state.values())
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = os.path.join(tmp, "model.pt")
        save_file(state, path)
        del state
        file_bytes = os.path.getsize(path)
        measure("aiockpt.load", path)  # warm the page cache once, for every contender
        mib = 2**20
        print(f"file {file_bytes / mib:.0f} MiB, tensors {tensor_bytes / mib:.0f} MiB")
        print(f"{'contender':36}{'peak RSS rise: load':>22}{'then used':>12}{'load s':>9}")
        sums = set()
        for how in CONTENDERS:
            r = measure(how, path)
            sums.add(r["sum"])
            load_rise = (r["after_load"] - r["before"]) / mib
            use_rise = (r["after_use"] - r["before"]) / mib
            print(f"{how:36}{load_rise:>18.0f} MiB{use_rise:>8.0f} MiB{r['load_s']:>9.2f}")
        assert len(sums) == 1, f"contenders loaded different data: {sums}"


if __name__ == "__main__":
    main()
