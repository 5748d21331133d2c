"""Run by tests/test_distributed.py under `accelerate launch`: select, collect, project; save results."""

import json
import sys

import torch
from accelerate import Accelerator
from safetensors.torch import save_file


sys.path.insert(0, __file__.rsplit("/", 1)[0])
from helpers import random_examples  # noqa: E402

from sap_hf import SAPConfig, collect_statistics, sap_project, select_trusted
from sap_hf.core.targets import find_target_modules
from sap_hf.models import tiny_model  # noqa: E402
from sap_hf.runtime.batching import subset  # noqa: E402
from sap_hf.runtime.passes import Runtime


def count_decodes() -> list[int]:
    """This process's real PIL decodes so far (a no-op reload of a decoded image is not one), in a one-item list."""
    from PIL import ImageFile

    decodes = [0]
    load = ImageFile.ImageFile.load

    def counting_load(self, *args, **kwargs):
        decodes[0] += bool(self.tile)
        return load(self, *args, **kwargs)

    ImageFile.ImageFile.load = counting_load
    return decodes


def trainer(out_dir: str, data_dir: str) -> None:
    """SAPTrainer.correct() on streaming Clothing1M, alpha by loss; one evaluation's decodes per process, new and old."""
    decodes = count_decodes()
    from accelerate.utils import gather_object
    from transformers import TrainingArguments, ViTForImageClassification

    from sap_hf.data import ImageTransform, load_clothing1m, undecoded_images
    from sap_hf.models import tiny_vit_config
    from sap_hf.trainer import SAPTrainer

    torch.manual_seed(0)
    model = ViTForImageClassification(
        tiny_vit_config(
            image_size=16, patch_size=4, num_channels=3, num_labels=14, hidden_size=32, num_hidden_layers=2
        )
    )
    train, val = (
        undecoded_images(load_clothing1m(data_dir, split, num_shards=4)) for split in ("noisy_train", "validation")
    )
    args = TrainingArguments(
        output_dir=f"{out_dir}/run",
        per_device_eval_batch_size=4,
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
        remove_unused_columns=False,
        max_steps=1,
        metric_for_best_model="loss",
        greater_is_better=False,
    )
    sap = SAPTrainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=val,
        data_collator=ImageTransform(image_size=16).collate,
        sap_config=SAPConfig(
            alphas=[1.0, 10.0, 100.0], trusted_per_class=2, batch_size=4, accumulation_dtype="float64"
        ),
    )
    result = sap.correct()
    logged = [
        {k: v for k, v in entry.items() if k in ("sap/alpha", "sap/loss", "sap/accuracy")}
        for entry in sap.state.log_history
        if "sap/alpha" in entry
    ]
    evaluate_fn = sap._sap_evaluator(val)[2]
    before = decodes[0]
    shared = evaluate_fn(sap.model)
    shared_decodes, before = gather_object([decodes[0] - before]), decodes[0]
    old = sap.evaluate(val)  # Trainer.evaluate, for the record: who decodes what
    old_decodes = gather_object([decodes[0] - before])
    if sap.accelerator.is_main_process:
        with open(f"{out_dir}/result.json", "w") as handle:
            json.dump(
                {
                    "alpha": result.alpha,
                    "logged": logged,
                    "shared": shared,
                    "shared_decodes": shared_decodes,
                    "old": {"loss": old["eval_loss"], "accuracy": old["eval_accuracy"]},
                    "old_decodes": old_decodes,
                    "processes": sap.accelerator.num_processes,
                },
                handle,
            )
    sap.accelerator.wait_for_everyone()
    sap.accelerator.end_training()


def clothing(out_dir: str, data_dir: str) -> None:
    """sap_correct on a streaming Clothing1M directory (keyed rows, images decoded in collate); count decodes."""
    decodes = count_decodes()
    from accelerate.utils import gather_object
    from transformers import ViTForImageClassification

    from sap_hf import sap_correct
    from sap_hf.data import ImageTransform, load_clothing1m, undecoded_images
    from sap_hf.models import tiny_vit_config

    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = ViTForImageClassification(
        tiny_vit_config(
            image_size=16, patch_size=4, num_channels=3, num_labels=14, hidden_size=32, num_hidden_layers=2
        )
    )
    transform = ImageTransform(image_size=16)
    train, val = (
        undecoded_images(load_clothing1m(data_dir, split, num_shards=4)) for split in ("noisy_train", "validation")
    )
    config = SAPConfig(alphas=[1.0, 10.0, 100.0], trusted_per_class=2, batch_size=4, accumulation_dtype="float64")
    phases = []  # every evaluation pass, the per-kind trials of the default alpha_scope included
    result = sap_correct(
        model,
        train,
        val,
        config,
        runtime=Runtime(
            accelerator=accelerator,
            collate_fn=transform.collate,
            show_progress=False,
            on_phase=lambda phase, seconds: phases.append(phase),
        ),
    )
    total = sum(gather_object([decodes[0]]))
    if accelerator.is_main_process:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, f"{out_dir}/weights.safetensors")
        with open(f"{out_dir}/result.json", "w") as handle:
            json.dump(
                {
                    "indices": result.trusted_indices,
                    "alpha": result.alpha,
                    "decodes": total,
                    "evaluations": phases.count("evaluation"),
                    "processes": accelerator.num_processes,
                },
                handle,
            )
    accelerator.wait_for_everyone()
    accelerator.end_training()  # destroy the gloo group before exit (else a teardown race can abort the process)


def recorded(out_dir: str, data_dir: str) -> None:
    """Selection without a full pass on every process: a hashed share of a keyed stream, and SAPTrainer's training losses."""
    decodes = count_decodes()
    from accelerate.utils import gather_object
    from helpers import MapStyle
    from transformers import TrainingArguments, ViTForImageClassification

    from sap_hf.data import ImageTransform, load_clothing1m, undecoded_images
    from sap_hf.models import tiny_vit_config
    from sap_hf.trainer import SAPTrainer
    from sap_hf.trainer.recorded import merge_losses

    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = ViTForImageClassification(
        tiny_vit_config(
            image_size=16, patch_size=4, num_channels=3, num_labels=14, hidden_size=32, num_hidden_layers=2
        )
    )
    train = undecoded_images(load_clothing1m(data_dir, "noisy_train", num_shards=4))
    runtime = Runtime(
        batch_size=4, accelerator=accelerator, collate_fn=ImageTransform(image_size=16).collate, show_progress=False
    )
    before = decodes[0]
    share = select_trusted(model, train, 1, runtime=runtime, seed=5, subset=0.6)
    share_decodes = sum(gather_object([decodes[0] - before]))
    args = TrainingArguments(
        output_dir=f"{out_dir}/run",
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
        num_train_epochs=1,
        learning_rate=0.0,
        save_strategy="no",
    )
    sap = SAPTrainer(
        model=tiny_model("vit", num_labels=3, seed=0),
        args=args,
        train_dataset=MapStyle(random_examples(23, seed=5)),
        eval_dataset=random_examples(12, seed=2),
        sap_config=SAPConfig(
            alphas=[1.0, 100.0], trusted_per_class=2, batch_size=4, trusted_source="training", audit_source="training"
        ),
    )
    sap.train()
    positions, losses, _ = merge_losses(gather_object([sap.training_losses.summary()]))
    result = sap.correct()
    audit = sap.audit_labels(output_dir=f"{out_dir}/audit")
    if accelerator.is_main_process:
        with open(f"{out_dir}/result.json", "w") as handle:
            json.dump(
                {
                    "share": share.indices,
                    "share_decodes": share_decodes,
                    "positions": positions,
                    "losses": losses.tolist(),
                    "trusted": result.trusted_indices,
                    "audit_scores": audit.scores.tolist(),
                    "audit_suspected": audit.suspected.tolist(),
                    "processes": accelerator.num_processes,
                },
                handle,
            )
    accelerator.wait_for_everyone()
    accelerator.end_training()


def main(out_dir: str, mode: str = "equal", *args: str) -> None:
    if mode in ("clothing", "trainer", "recorded"):
        return {"clothing": clothing, "trainer": trainer, "recorded": recorded}[mode](out_dir, *args)
    accelerator = Accelerator(cpu=True)
    model = tiny_model("vit", num_labels=3, seed=0)
    data = random_examples(23, num_labels=3, seed=5)  # 23: uneven shards on 2 processes
    if mode == "fail":  # example 1 lands on process 1 only: it fails, process 0 must not hang
        data[1] = {"pixel_values": torch.randn(3, 9, 9), "labels": 1}
        try:
            collect_statistics(
                model,
                data,
                find_target_modules(model),
                runtime=Runtime(batch_size=4, accelerator=accelerator, show_progress=False),
            )
            failed = False
        except Exception as err:  # what each process raised, written before any process exits:
            print(f"[process {accelerator.process_index}] {type(err).__name__}: {err}", file=sys.stderr, flush=True)
            failed = True
        # the launcher terminates the others once one exits, so a process slowed down after the error
        # collective (a loaded machine) could be killed before its error is printed
        accelerator.wait_for_everyone()
        accelerator.end_training()
        sys.exit(1 if failed else 0)
    selection = select_trusted(
        model, data, 3, runtime=Runtime(batch_size=4, accelerator=accelerator, show_progress=False)
    )
    shifted = select_trusted(
        model, data, 2, rule="shift_loss", runtime=Runtime(batch_size=4, accelerator=accelerator, show_progress=False)
    )
    curved = select_trusted(
        model, data, 2, rule="curvature", runtime=Runtime(batch_size=4, accelerator=accelerator, show_progress=False)
    )
    trusted = subset(data, selection.indices)
    stats = collect_statistics(
        model,
        trusted,
        find_target_modules(model),
        accumulation_dtype="float64",
        runtime=Runtime(batch_size=2, accelerator=accelerator, show_progress=False),
    )
    sap_project(model, trusted, 10.0, SAPConfig(batch_size=2), Runtime(accelerator=accelerator, show_progress=False))
    if accelerator.is_main_process:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, f"{out_dir}/weights.safetensors")
        save_file({k: v.contiguous() for k, v in stats.grams.items()}, f"{out_dir}/grams.safetensors")
        with open(f"{out_dir}/result.json", "w") as handle:
            json.dump(
                {
                    "indices": selection.indices,
                    "shift_indices": shifted.indices,
                    "curvature_indices": curved.indices,
                    "curvature_scores": curved.losses,
                    "counts": stats.counts,
                    "processes": accelerator.num_processes,
                },
                handle,
            )
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main(*sys.argv[1:])
