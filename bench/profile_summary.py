"""Summarise a profile of the pttd daemon from ``bench/compare_sdk.py``.

    python bench/profile_summary.py DIR          # --cprofile DIR: one .prof per thread
    python bench/profile_summary.py FILE.txt     # --py-spy FILE: py-spy's raw (collapsed) stacks

cProfile (preferred here): each thread was profiled with ``time.thread_time`` as the timer, so
the times are CPU time of that thread (cProfile's own overhead inflates them ~2x; compare
functions with each other, not with the un-profiled run). Prints CPU per thread, then the top
functions by own time and by cumulative time, with call counts.

py-spy: samples per thread and top functions. In this container ``py-spy`` cannot attach by
pid and its idle detection keeps threads parked in ``Condition.wait``, so its samples are
closer to wall time than CPU time; use it for call paths, cProfile for costs.
"""
from __future__ import annotations

import argparse
import collections
import os
import pstats
import re


def summarise_cprofile(folder: str, top: int) -> None:
    files = sorted(f for f in os.listdir(folder) if f.endswith(".prof"))
    per_thread = collections.Counter()
    for name in files:
        st = pstats.Stats(os.path.join(folder, name))
        thread = re.sub(r"-?\d+\.prof$", "", name)
        thread = re.sub(r"\d+", "N", thread)
        per_thread[thread] += st.total_tt
    total = sum(per_thread.values())
    print(f"cProfile, {len(files)} threads, {total * 1000:.0f} ms CPU in all (profiled)")
    print("\nCPU by thread (all threads of that name summed):")
    for thread, t in per_thread.most_common():
        print(f"  {t * 1000:8.1f} ms {100 * t / total:5.1f} %  {thread}")
    stats = pstats.Stats(*(os.path.join(folder, f) for f in files))
    rows = []
    for (path, line, func), (cc, nc, tt, ct, _callers) in stats.stats.items():
        short = re.sub(r"^.*/(site-packages|lib/python3\.\d+|daemon)/", "", path)
        rows.append((tt, ct, nc, f"{func} ({short}:{line})"))
    print(f"\ntop {top} by own time:")
    print(f"  {'own ms':>8} {'cum ms':>8} {'calls':>8}  function")
    for tt, ct, nc, name in sorted(rows, reverse=True)[:top]:
        print(f"  {tt * 1000:8.1f} {ct * 1000:8.1f} {nc:8d}  {name}")
    print(f"\ntop {top} by cumulative time (pttd and websocket code):")
    picked = [r for r in rows if "pttd/" in r[3] or "websocket/" in r[3]]
    for tt, ct, nc, name in sorted(picked, key=lambda r: -r[1])[:top]:
        print(f"  {tt * 1000:8.1f} {ct * 1000:8.1f} {nc:8d}  {name}")


def summarise_pyspy(path: str, top: int) -> None:
    threads: collections.Counter = collections.Counter()
    inclusive: collections.Counter = collections.Counter()
    total = 0
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack:
                continue
            n = int(count)
            frames = stack.split(";")
            threads[re.sub(r"\d+", "N", re.sub(r"^thread \(\d+\): ?", "", frames[0]) or "?")] += n
            total += n
            for name in {re.sub(r":\d+\)$", ")", fr) for fr in frames[1:]}:
                inclusive[name] += n
    print(f"py-spy, {total} samples\n\nby thread:")
    for name, count in threads.most_common():
        print(f"  {count:6d} {100 * count / total:5.1f} %  {name}")
    print(f"\ntop {top} functions, inclusive:")
    for name, count in inclusive.most_common(top):
        print(f"  {count:6d} {100 * count / total:5.1f} %  {name}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("profile", help="a --cprofile folder or a --py-spy raw file")
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    if os.path.isdir(args.profile):
        summarise_cprofile(args.profile, args.top)
    else:
        summarise_pyspy(args.profile, args.top)


if __name__ == "__main__":
    main()
