"""Speed of writing the synthetic crowded scenes (issue 13: the defaults must write in under a minute).

    python experiments/benchmarks/synthetic_scenes_speed.py [--train-scenes 500] [--test-scenes 250] [--repeats 2]

One row per layout and worker count: scenes written, wall seconds (planning, drawing, JPEG encoding,
the annotation .mat files, the manifest and the rename into place: everything `write_scenes`
does), scenes per wall second and per CPU-second of this process and its workers (OpenCV runs
single-threaded, so CPU-seconds are core-seconds: the number stays honest when other jobs share
the cores, the wall time does not). The last columns split one core's work: planning alone, and
drawing + encoding in memory (no files). The fastest of `--repeats` runs is kept.
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import tempfile
import time

import cv2
import numpy as np

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))
from reid_keras.data.datasets import synthetic, synthetic_scene_layout, synthetic_scenes  # noqa: E402
from machine import describe_machine  # noqa: E402  (experiments/benchmarks/machine.py)


def _cpu_seconds() -> float:
    """User + system CPU time of this process plus its finished children (the worker pool)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def one_run(layout: str, train: int, test: int, workers: int) -> tuple:
    """(wall seconds, CPU seconds) of one `write_scenes` into a fresh temp folder."""
    out = tempfile.mkdtemp(prefix="synthetic_scenes_speed_")
    try:
        start, cpu = time.perf_counter(), _cpu_seconds()
        synthetic.write_scenes(layout, out, train_scenes=train, test_scenes=test, workers=workers)
        return time.perf_counter() - start, _cpu_seconds() - cpu
    finally:
        shutil.rmtree(out, ignore_errors=True)


def split_costs(layout: str, train: int, test: int) -> tuple:
    """(planning CPU seconds, drawing + JPEG encoding in memory: scenes per CPU-second) on one core."""
    cpu = time.process_time()
    plan = synthetic_scene_layout.plan_scenes(layout, 0, train, test)
    planning = time.process_time() - cpu
    cpu = time.process_time()
    for index in range(len(plan.scenes)):
        image, _ = synthetic_scenes.render_scene(plan, index)
        cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, synthetic_scenes.JPEG_QUALITY])
    return planning, len(plan.scenes) / (time.process_time() - cpu)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-scenes", type=int, default=500, help="training scenes (default: %(default)s)")
    parser.add_argument("--test-scenes", type=int, default=250, help="test scenes (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per row, fastest kept (default: %(default)s)")
    args = parser.parse_args(argv)
    cv2.setNumThreads(1)
    scenes = args.train_scenes + args.test_scenes
    print(f"machine: {describe_machine(numpy=np.__version__, OpenCV=cv2.__version__)}")
    print(f"{args.train_scenes} train + {args.test_scenes} test scenes of 400x600, fastest of {args.repeats} run(s)\n")
    print("| layout | workers | scenes | seconds (wall) | scenes/s (wall) | scenes/s/core | "
          "planning, s (1 core) | draw+encode only, scenes/s/core |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for layout in synthetic_scene_layout.SCENE_LAYOUTS:
        for workers in (1, 2):
            runs = [one_run(layout, args.train_scenes, args.test_scenes, workers) for _ in range(args.repeats)]
            wall, cpu = min(runs)
            split = "- | -"
            if workers == 1:
                planning, rate = split_costs(layout, args.train_scenes, args.test_scenes)
                split = f"{planning:.2f} | {rate:.0f}"
            print(f"| {layout} | {workers} | {scenes} | {wall:.2f} | {scenes / wall:.0f} | {scenes / cpu:.0f} | {split} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
