"""Two CPU processes (gloo) give the same trusted indices, statistics and weights as one."""

import json
from pathlib import Path

import torch
from launching import accelerate_launch
from safetensors.torch import load_file


WORKER = Path(__file__).with_name("distributed_worker.py")


def launch(out: Path, processes: int, mode: str = "equal", expect_ok: bool = True, args: tuple = ()) -> dict:
    out.mkdir()
    run = accelerate_launch(processes, [WORKER, out, mode, *args], timeout=300)
    if not expect_ok:
        return {"returncode": run.returncode, "stderr": run.stderr}
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads((out / "result.json").read_text())


def test_two_processes_equal_one(tmp_path):
    one = launch(tmp_path / "one", 1)
    two = launch(tmp_path / "two", 2)
    assert one["processes"] == 1 and two["processes"] == 2
    assert one["indices"] == two["indices"] and len(one["indices"]) == 9
    assert one["shift_indices"] == two["shift_indices"] and len(one["shift_indices"]) == 6
    assert one["curvature_indices"] == two["curvature_indices"] and len(one["curvature_indices"]) == 6
    assert (
        max(abs(a - b) / a for a, b in zip(one["curvature_scores"], two["curvature_scores"])) < 1e-3
    )  # a difference of close float32 gradients
    assert one["counts"] == two["counts"]
    for name in ("grams", "weights"):
        a, b = load_file(tmp_path / "one" / f"{name}.safetensors"), load_file(tmp_path / "two" / f"{name}.safetensors")
        assert a.keys() == b.keys()
        for key in a:
            scale = a[key].abs().max().clamp_min(1e-12)
            assert ((a[key] - b[key]).abs().max() / scale) <= 1e-6, key


def test_a_failure_on_one_process_fails_all_without_hanging(tmp_path):
    run = launch(tmp_path / "fail", 2, mode="fail", expect_ok=False)  # subprocess timeout = hang
    assert run["returncode"] != 0
    assert "pixel_values of shapes" in run["stderr"]  # the failing process reports its own error (the size check)
    assert "Another process failed" in run["stderr"]  # the other one raises too instead of hanging


def test_streaming_clothing1m_with_keys_same_on_two_processes_and_each_image_decoded_once(tmp_path):
    from sap_hf.data import write_tiny_clothing1m

    data = write_tiny_clothing1m(tmp_path / "c1m", per_class=3, image_size=16, seed=0)
    one = launch(tmp_path / "one", 1, "clothing", args=(str(data),))
    two = launch(tmp_path / "two", 2, "clothing", args=(str(data),))
    assert two["processes"] == 2
    assert one["indices"] == two["indices"] and 14 <= len(one["indices"]) <= 28  # <= 2 per (noisy) class, by key
    assert all(isinstance(key, str) and key.startswith("images/") for key in one["indices"])
    assert one["alpha"] == two["alpha"]
    a, b = load_file(tmp_path / "one" / "weights.safetensors"), load_file(tmp_path / "two" / "weights.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
    # 42 training images read once, the trusted ones once more for the statistics, 42 validation images per evaluation
    expected = 42 + len(one["indices"]) + 42 * one["evaluations"]
    assert one["decodes"] == two["decodes"] == expected


def test_sap_trainer_evaluation_is_shared_same_on_two_processes_and_each_decodes_its_half(tmp_path):
    from sap_hf.data import write_tiny_clothing1m

    data = write_tiny_clothing1m(tmp_path / "c1m", per_class=3, image_size=16, seed=0)
    one = launch(tmp_path / "one", 1, "trainer", args=(str(data),))
    two = launch(tmp_path / "two", 2, "trainer", args=(str(data),))
    assert two["processes"] == 2 and one["alpha"] == two["alpha"]  # chosen by loss (metric_for_best_model="loss")
    assert [entry["sap/alpha"] for entry in one["logged"]] == [entry["sap/alpha"] for entry in two["logged"]]

    def scores(run: dict) -> list:
        return [(e["sap/accuracy"], e["sap/loss"]) for e in run["logged"]] + [
            (run["shared"]["accuracy"], run["shared"]["loss"])
        ]

    for (accuracy_one, loss_one), (accuracy_two, loss_two) in zip(scores(one), scores(two), strict=True):
        assert accuracy_one == accuracy_two and abs(loss_one - loss_two) <= 1e-6
    assert (
        one["shared"]["accuracy"] == one["old"]["accuracy"] and abs(one["shared"]["loss"] - one["old"]["loss"]) <= 1e-6
    )
    # one evaluation of the 42 validation images: each process decodes only its shards (Trainer.evaluate: the main all)
    assert (
        one["shared_decodes"] == [42]
        and sum(two["shared_decodes"]) == 42
        and max(two["shared_decodes"]) <= 42 // 2 + 1
    )


def test_selection_without_a_full_pass_is_the_same_on_two_processes(tmp_path):
    """A hashed share of a keyed stream (each drawn image decoded once, by one process) and SAPTrainer's
    recorded training losses (gathered from both processes, the sampler's padded repeat averaged) select alike, and
    the label audit from the recorded margins ranks and flags alike."""
    from sap_hf.data import write_tiny_clothing1m
    from sap_hf.utils.identity import HashSample

    data = write_tiny_clothing1m(tmp_path / "c1m", per_class=8, image_size=16, seed=0)
    one = launch(tmp_path / "one", 1, "recorded", args=(str(data),))
    two = launch(tmp_path / "two", 2, "recorded", args=(str(data),))
    assert two["processes"] == 2
    keys = [line.split()[0] for line in (data / "noisy_label_kv.txt").read_text().splitlines() if line.strip()]
    drawn = [k for k in keys if k in HashSample(0.6, 5)]
    assert one["share"] == two["share"] and set(one["share"]) <= set(drawn)
    assert one["share_decodes"] == two["share_decodes"] == len(drawn) < len(keys)
    assert one["positions"] == two["positions"] == list(range(23))
    assert max(abs(a - b) for a, b in zip(one["losses"], two["losses"])) < 1e-5
    assert one["trusted"] == two["trusted"] and len(one["trusted"]) == 6
    # the label audit from the recorded margins (audit_source="training"): the same ranking and suspects
    assert max(abs(a - b) for a, b in zip(one["audit_scores"], two["audit_scores"])) < 1e-5
    assert one["audit_suspected"] == two["audit_suspected"] and len(one["audit_scores"]) == 23
