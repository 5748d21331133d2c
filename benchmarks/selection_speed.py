"""Trusted-selection throughput against plain inference on the same images (issue: within 10%).

`inference` (a DataLoader + forward loop) and `selection` (`sap_hf.select_trusted`) read the same Fashion-MNIST images
through the same transform and batch size, interleaved, best of --repeats. Protocol and result:
benchmarks/studies/cost.md, section "Trusted-selection throughput".

    python benchmarks/selection_speed.py [--n 4000] [--quick]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import common  # also puts this checkout's sap_hf first on sys.path
import torch
from torch.utils.data import DataLoader
from transformers import ViTForImageClassification, default_data_collator

from sap_hf import select_trusted
from sap_hf.data import ImageTransform, noisy_fashion_mnist
from sap_hf.models import tiny_vit_config
from sap_hf.runtime.passes import Runtime


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4000)
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="tiny smoke run")
    parser.add_argument("--out", default=str(common.RESULTS_DIR))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.quick:
        args.n, args.repeats = 300, 1
    data = noisy_fashion_mnist(train_size=args.n, val_size=10, test_size=10)["train"]
    data = data.with_transform(ImageTransform(image_size=28, num_channels=1))
    torch.manual_seed(0)
    model = ViTForImageClassification(tiny_vit_config()).eval()

    def inference() -> None:
        with torch.no_grad():
            for batch in DataLoader(data, batch_size=args.batch_size, collate_fn=default_data_collator):
                model(pixel_values=batch["pixel_values"])

    def selection() -> None:
        select_trusted(model, data, 10, runtime=Runtime(batch_size=args.batch_size, show_progress=False))

    passes = {"inference": inference, "selection": selection}
    timings: dict[str, list[float]] = {name: [] for name in passes}
    for _ in range(args.repeats):
        for name, run in passes.items():
            start = time.perf_counter()
            run()
            timings[name].append(time.perf_counter() - start)
    best = {name: min(values) for name, values in timings.items()}
    ratio = best["selection"] / best["inference"]
    rows = [
        {"method": k, "n_samples": args.n, "seconds": s, "samples_per_second": args.n / s} for k, s in best.items()
    ]
    print(f"{'method':<10} {'n':>6} {'seconds':>8} {'samples/s':>10}")
    for row in rows:
        print(f"{row['method']:<10} {row['n_samples']:>6} {row['seconds']:>8.3f} {row['samples_per_second']:>10.1f}")
    print(f"selection / inference time: {ratio:.3f} (target <= 1.10); torch threads: {torch.get_num_threads()}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {"rows": rows, "time_ratio": ratio, "target": 1.10, "threads": torch.get_num_threads()}
    common.write_json(out / ("selection_speed_quick.json" if args.quick else "selection_speed.json"), record, indent=2)


if __name__ == "__main__":
    main()
