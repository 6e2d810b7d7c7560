"""Where a long sample's memory goes: one forward + backward (the training loss, no optimizer) of one
row, in one plain process or as one rank of sequence_parallel_size 2, with both views of the peak:

    python bench/long_context_profile.py --model 100m --length 4096                       # one process
    python -m torch.distributed.run --nproc_per_node 2 bench/long_context_profile.py \
        --model 100m --length 4096                                                         # SP=2 over gloo

- RSS: the kernel's high-water mark of the process (VmHWM, reset just before the step through
  /proc/self/clear_refs) less its RSS before the step: what the OS sees, glibc's keeping included;
- live tensors: torch.profiler's CPU allocation and free events (profile_memory=True) summed in time
  order, their peak: the CPU analogue of CUDA's max_memory_allocated() - memory_allocated() before.
  Only what is allocated during the step is counted (the weights are not).

Also printed: the 12 largest allocations live at the peak (as of the last allocation over 1 MiB that set
a new peak), each with the innermost operator that made it. The row is one document (every
token attends to every earlier one), with segment ids as a packed row carries them (the bench's rows).
One JSON line per rank (`PROFILE {...}`).
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from long_context import SHAPES  # noqa: E402


def status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def live_peak(trace: dict) -> tuple[float, list]:
    """(peak MB of bytes allocated and not yet freed during the trace, [(MB, op) of the 12 largest live then])."""
    events = trace["traceEvents"]
    ops = sorted(
        (e["ts"], e["ts"] + e.get("dur", 0), e["name"])
        for e in events
        if e.get("ph") == "X" and e.get("cat") == "cpu_op"
    )
    starts = [o[0] for o in ops]

    def maker(ts: float) -> str:  # the shortest operator spanning ts (a linear scan back over its neighbours)
        best = None
        for i in range(bisect.bisect_right(starts, ts) - 1, max(-1, bisect.bisect_right(starts, ts) - 400), -1):
            start, end, name = ops[i]
            if start <= ts <= end and (best is None or end - start < best[0]):
                best = (end - start, name)
        return best[1] if best else "?"

    memory = sorted((e for e in events if e.get("name") == "[memory]"), key=lambda e: e["ts"])
    live, total, peak, peak_live = {}, 0, 0, {}
    for e in memory:
        args = e["args"]
        if args.get("Device Type", 0) != 0:  # CPU only
            continue
        size, address = int(args["Bytes"]), args["Addr"]
        if size > 0:
            live[address] = (size, e["ts"])
        else:
            live.pop(address, None)
        total += size
        if total > peak:
            peak = total
            peak_live = dict(live) if size > 1 << 20 else peak_live  # snapshot at big steps (cheap enough)
    largest = sorted(peak_live.values(), reverse=True)[:12]
    return peak / 2**20, [(round(size / 2**20, 1), maker(ts)) for size, ts in largest]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(SHAPES), default="100m")
    parser.add_argument("--length", type=int, default=4096, help="tokens in the row (the whole row, before the split)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from bumblecore import Bumblebee, BumblebeeConfig
    from bumblecore.train.sft import LanguageModelingStage

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    torch.manual_seed(0)
    model = Bumblebee(BumblebeeConfig.from_preset("0.5B", torch_dtype="float32", **SHAPES[args.model])).train()
    n = args.length
    ids = torch.randint(1, model.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "labels": ids.clone(), "position_ids": torch.arange(n)[None],
             "segment_ids": torch.zeros(1, n, dtype=torch.long), "num_tokens": n}  # fmt: skip
    if world > 1:
        import deepspeed

        from bumblecore.model.sequence_parallel import use_sequence_parallel
        from bumblecore.train.backend import sequence_parallel_group
        from bumblecore.train.sequence_parallel import shard

        deepspeed.init_distributed("gloo")
        use_sequence_parallel(model, sequence_parallel_group(world), world)
        batch = shard(batch, world, rank, longest_row=n)
        torch.distributed.barrier()
    stage = LanguageModelingStage()
    before = status_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        loss, _ = stage.loss(model, batch)
        loss.backward()
    rss_peak = status_mb("VmHWM") - before
    with tempfile.TemporaryDirectory() as tmp:
        prof.export_chrome_trace(f"{tmp}/trace.json")
        trace = json.loads(Path(f"{tmp}/trace.json").read_text())
    peak, largest = live_peak(trace)
    record = {"model": args.model, "length": n, "world": world, "rank": rank, "rss_growth_mb": round(rss_peak, 1),
              "live_peak_mb": round(peak, 1), "largest_live_at_peak": largest}  # fmt: skip
    print("PROFILE " + json.dumps(record), flush=True)
    if world > 1:
        torch.distributed.barrier()


if __name__ == "__main__":
    main()
