"""Run by tests/test_audit_cli.py under `accelerate launch`: audit the labels, refine; save what must match."""

import json
import os
import sys

import torch
from accelerate import Accelerator
from transformers import TrainingArguments


sys.path.insert(0, __file__.rsplit("/", 1)[0])
from helpers import random_examples  # noqa: E402

from sap_hf import RefineConfig, audit_labels, refine  # noqa: E402
from sap_hf.evaluation import accuracy_evaluator  # noqa: E402
from sap_hf.models import tiny_model  # noqa: E402
from sap_hf.runtime.passes import Runtime


def main(out_dir: str) -> None:
    torch.manual_seed(0)
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    # Before the Accelerator: a TrainingArguments made later resets the process state the Accelerator holds.
    args = TrainingArguments(
        output_dir=f"{out_dir}/refine",
        per_device_train_batch_size=8 // processes,
        use_cpu=True,
        report_to=[],
        disable_tqdm=True,
        seed=0,
    )
    accelerator = Accelerator(cpu=True)
    model = tiny_model("vit", num_labels=3, seed=0)
    data = random_examples(23, num_labels=3, seed=5)  # 23: uneven shards on 2 processes
    audit = audit_labels(
        model,
        data,
        filter_by="predicted_neq_given",
        runtime=Runtime(batch_size=4, accelerator=accelerator, show_progress=False),
    )
    val = accuracy_evaluator(
        random_examples(9, num_labels=3, seed=6), runtime=Runtime(batch_size=4, accelerator=accelerator)
    )
    calls = []

    def evaluate(m):  # every checkpoint "improves": the final weights are those after the whole run
        calls.append(1)
        return {"accuracy": float(len(calls)), "val": val(m)["accuracy"]}

    # refine: 24 images, all kept ('soft'), a global batch of 8 however many processes: the same batches, no padding
    refine_data = random_examples(24, num_labels=3, seed=7)
    refine_audit = audit_labels(
        model, refine_data, runtime=Runtime(batch_size=4, accelerator=accelerator, show_progress=False)
    )
    config = RefineConfig(mode="soft", learning_rates=[1e-2], epochs=[1, 2])
    result = refine(
        model,
        refine_data,
        refine_audit,
        evaluate,
        config,
        args=args,
        runtime=Runtime(accelerator=accelerator, show_progress=False),
    )
    if accelerator.is_main_process:
        weights = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        with open(f"{out_dir}/result.json", "w") as handle:
            json.dump(
                {
                    "processes": accelerator.num_processes,
                    "ranking": audit.indices[audit.ranking].tolist(),
                    "suspected": audit.suspected.tolist(),
                    "scores": audit.scores.tolist(),
                    "refine_trials": [t["metrics"]["val"] for t in result.trials],
                    "refine_epochs": result.epochs,
                    "weights": weights[:: max(1, weights.numel() // 2000)].tolist(),
                },
                handle,
            )
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main(*sys.argv[1:])
