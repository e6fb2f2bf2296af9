"""ppo_cli.checkpoint: atomic, verified checkpoints; resume-point selection; pruning; RNG round trips."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from ppo_cli import checkpoint as ckpt
from ppo_cli.errors import UserError


def tensors(value: float) -> dict[str, torch.Tensor]:
    return {
        "layer.lora_A.weight": torch.full((4, 3), value),
        "layer.lora_B.weight": torch.arange(6.0) * value,
    }


def save(output_dir: Path, step: int, keep_last: int = 10, **state) -> Path:
    objects = {"optimizer": {"state": {0: {"exp_avg": torch.ones(2) * step}}, "param_groups": [{"lr": 0.1}]}}
    return ckpt.save_checkpoint(
        output_dir,
        step,
        tensors(float(step)),
        objects,
        {"data": {"epoch": 0, "offset": step}, **state},
        keep_last,
    )


def steps_on_disk(output_dir: Path) -> list[int]:
    return [step for step, _ in ckpt.list_checkpoints(output_dir)]


def test_save_then_load_round_trips_everything(tmp_path):
    path = save(tmp_path, 3)
    assert path == tmp_path / "checkpoints" / "step-000003"
    assert sorted(p.name for p in path.iterdir()) == sorted(
        [ckpt.TRAINABLE, ckpt.STATE, ckpt.TRAINER_STATE, ckpt.MANIFEST]
    )
    manifest = json.loads((path / ckpt.MANIFEST).read_text())
    assert set(manifest) == {ckpt.TRAINABLE, ckpt.STATE, ckpt.TRAINER_STATE}
    assert ckpt.verify_checkpoint(path) is None
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))  # the temporary directory was renamed away

    loaded = ckpt.load_checkpoint(path)
    assert loaded.step == 3
    assert loaded.state["data"] == {"epoch": 0, "offset": 3}
    for name, tensor in tensors(3.0).items():
        assert torch.equal(loaded.trainable[name], tensor)
    assert torch.equal(loaded.objects["optimizer"]["state"][0]["exp_avg"], torch.ones(2) * 3)


def test_newest_checkpoint_without_manifest_is_skipped_for_the_older_one(tmp_path):
    save(tmp_path, 2)
    newest = save(tmp_path, 4)
    (newest / ckpt.MANIFEST).unlink()  # as if the process died before the manifest was written
    with pytest.warns(UserWarning, match=r"skipping checkpoint .*step-000004: no manifest"):
        assert ckpt.latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step-000002"
    with pytest.raises(UserError, match="cannot be resumed: no manifest"):
        ckpt.load_checkpoint(newest)


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_damaged_checkpoint_is_skipped_for_the_older_one(tmp_path, damage):
    save(tmp_path, 2)
    newest = save(tmp_path, 4)
    target = newest / ckpt.TRAINABLE
    data = bytearray(target.read_bytes())
    if damage == "flip":  # same size, different content: only the checksum can tell
        data[-1] ^= 0xFF
        target.write_bytes(bytes(data))
        reason = "corrupt"
    elif damage == "truncate":
        target.write_bytes(bytes(data[:-10]))
        reason = "bytes, expected"
    else:
        target.unlink()
        reason = "missing"
    assert reason in ckpt.verify_checkpoint(newest)
    with pytest.warns(UserWarning, match=f"step-000004: .*{reason}"):
        latest = ckpt.latest_checkpoint(tmp_path)
    assert latest == tmp_path / "checkpoints" / "step-000002"
    with pytest.warns(UserWarning):
        assert ckpt.resolve_resume(tmp_path, "auto", "sft") == latest
    with pytest.raises(UserError, match="not usable"):
        ckpt.resolve_resume(tmp_path, str(newest), "sft")


def test_no_intact_checkpoint_means_start_fresh(tmp_path):
    assert ckpt.latest_checkpoint(tmp_path) is None
    only = save(tmp_path, 1)
    (only / ckpt.MANIFEST).write_text("{not json")
    with pytest.warns(UserWarning, match="unreadable manifest"):
        assert ckpt.latest_checkpoint(tmp_path) is None


def test_keep_last_prunes_older_checkpoints(tmp_path):
    for step in range(1, 6):
        save(tmp_path, step, keep_last=2)
    assert steps_on_disk(tmp_path) == [4, 5]
    save(tmp_path, 6, keep_last=0)  # 0 = keep everything
    assert steps_on_disk(tmp_path) == [4, 5, 6]
    # Step numbers sort numerically, not as strings, past six digits.
    save(tmp_path, 1_000_000, keep_last=2)
    assert steps_on_disk(tmp_path) == [6, 1_000_000]


class Crash(BaseException):
    """Stands in for SIGKILL: nothing after it runs."""


def crash_after_one_unlink(monkeypatch):
    """shutil.rmtree that removes one file of the directory and then dies, as a kill mid-delete would."""

    def rmtree(path, ignore_errors=False):
        files = sorted(p for p in Path(path).iterdir() if p.is_file()) if Path(path).is_dir() else []
        if files:
            files[0].unlink()
            raise Crash

    monkeypatch.setattr(ckpt.shutil, "rmtree", rmtree)


def test_a_crash_while_pruning_never_leaves_a_half_deleted_checkpoint(tmp_path, monkeypatch):
    save(tmp_path, 1, keep_last=1)
    crash_after_one_unlink(monkeypatch)
    with pytest.raises(Crash):
        save(tmp_path, 2, keep_last=1)  # written, then pruning step 1 dies halfway
    monkeypatch.undo()
    for step, path in ckpt.list_checkpoints(tmp_path):
        assert ckpt.verify_checkpoint(path) is None, f"step {step}"
    assert steps_on_disk(tmp_path) == [2]
    save(tmp_path, 3, keep_last=1)  # the next prune sweeps the interrupted delete's leftover
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000003"]


def test_a_crash_while_replacing_a_resaved_step_leaves_one_intact_copy(tmp_path, monkeypatch):
    save(tmp_path, 2)
    crash_after_one_unlink(monkeypatch)
    with pytest.raises(Crash):
        ckpt.save_checkpoint(tmp_path, 2, tensors(9.0), {}, {"data": {}}, keep_last=2)
    monkeypatch.undo()
    assert steps_on_disk(tmp_path) == [2]
    assert ckpt.verify_checkpoint(tmp_path / "checkpoints" / "step-000002") is None


def test_resaving_a_step_replaces_it(tmp_path):
    save(tmp_path, 2)
    ckpt.save_checkpoint(tmp_path, 2, tensors(9.0), {}, {"data": {}}, keep_last=2)
    assert steps_on_disk(tmp_path) == [2]
    assert torch.equal(
        ckpt.load_checkpoint(tmp_path / "checkpoints" / "step-000002").trainable["layer.lora_A.weight"],
        torch.full((4, 3), 9.0),
    )


def test_leftover_temp_dir_of_a_dead_writer_is_ignored_and_cleaned(tmp_path):
    save(tmp_path, 1)
    # A pid that cannot be alive (above the kernel's pid_max on any Linux).
    leftover = tmp_path / "checkpoints" / f".tmp-step-000002-{2**22 + 1}"
    leftover.mkdir()
    (leftover / ckpt.TRAINABLE).write_bytes(b"half")
    assert steps_on_disk(tmp_path) == [1]
    assert ckpt.latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step-000001"
    save(tmp_path, 3)
    assert not leftover.exists()


def test_rng_capture_restore_reproduces_draws_through_a_checkpoint(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.random(), np.random.rand(), torch.rand(1)  # move off the seeded start
    rng = ckpt.capture_rng()
    expected = (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist(), torch.randn(2).tolist())

    # Store it the way the trainer does: torch's state as a tensor in state.pt, the rest in JSON.
    torch_state = rng.pop("torch")
    rng.pop("cuda")
    path = ckpt.save_checkpoint(tmp_path, 1, tensors(1.0), {"rng_torch": torch_state}, {"rng": rng})
    for _ in range(5):  # scramble every generator
        random.random(), np.random.rand(), torch.rand(1)
    loaded = ckpt.load_checkpoint(path)
    ckpt.restore_rng(dict(loaded.state["rng"], torch=loaded.objects["rng_torch"], cuda=[]))
    got = (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist(), torch.randn(2).tolist())
    assert got == expected


def test_state_pt_is_loaded_with_weights_only(tmp_path):
    # A Path needs full pickle to load: weights_only refuses it (and so refuses code a checkpoint could run).
    path = ckpt.save_checkpoint(tmp_path, 1, tensors(1.0), {"thing": Path("x")}, {})
    assert ckpt.verify_checkpoint(path) is None
    with pytest.raises(UserError, match=r"refused by torch.load\(weights_only=True\)"):
        ckpt.load_checkpoint(path)


def test_load_trainable_state_refuses_mismatched_parameters():
    model = torch.nn.Linear(3, 2)
    state = ckpt.trainable_state(model)
    assert set(state) == {"weight", "bias"}
    ckpt.load_trainable_state(model, {k: torch.zeros_like(v) for k, v in state.items()}, "ck")
    assert torch.count_nonzero(model.weight) == 0
    with pytest.raises(UserError, match="does not match this run's trainable parameters"):
        ckpt.load_trainable_state(model, {"weight": torch.zeros(2, 3)}, "ck")


def test_resolve_resume_rules(tmp_path):
    assert ckpt.resolve_resume(tmp_path / "fresh", "never", "sft") is None
    assert ckpt.resolve_resume(tmp_path / "fresh", "auto", "sft") is None

    (tmp_path / ckpt.RUN_MARKER).write_text("stage: sft\n")
    first = save(tmp_path, 2)
    save(tmp_path, 4)
    assert ckpt.resolve_resume(tmp_path, "auto", "sft") == tmp_path / "checkpoints" / "step-000004"
    assert ckpt.resolve_resume(tmp_path, str(first), "sft") == first
    with pytest.raises(UserError, match="resume=never"):
        ckpt.resolve_resume(tmp_path, "never", "sft")
    with pytest.raises(UserError, match="holds a sft run, not a rm run"):
        ckpt.resolve_resume(tmp_path, "auto", "rm")
    with pytest.raises(UserError, match="no such checkpoint directory"):
        ckpt.resolve_resume(tmp_path, str(tmp_path / "nope"), "sft")


def test_checkpoint_files_are_fsynced_before_the_rename(tmp_path, monkeypatch):
    """Every file is fsync'ed and the manifest comes last, before the directory is renamed into place."""
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append("fsync:" + os.path.basename(os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        events.append("replace")
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "fsync", fsync)
    monkeypatch.setattr(ckpt.os, "replace", replace)
    save(tmp_path, 1)
    files = [e for e in events if e.startswith("fsync:") and "." in e.split(":", 1)[1]]
    assert set(files) >= {
        f"fsync:{n}" for n in (ckpt.TRAINABLE, ckpt.STATE, ckpt.TRAINER_STATE, ckpt.MANIFEST)
    }
    assert events.index(f"fsync:{ckpt.MANIFEST}") > max(
        events.index(f"fsync:{n}") for n in (ckpt.TRAINABLE, ckpt.STATE, ckpt.TRAINER_STATE)
    )
    assert events.index("replace") > events.index(f"fsync:{ckpt.MANIFEST}")
