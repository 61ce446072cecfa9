"""A full disk and an unwritable run directory: the error names what could not be written, and the last
complete state (checkpoint, adapter, cache entry, merged model) is left as it was.

ENOSPC is simulated by making one write raise OSError(ENOSPC) after it has written part of its file, as
a full disk does.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import tiny

from finetune.errors import RunDirError, WriteError
from finetune.files import atomic_dir
from finetune.recipe.load import load_recipe
from finetune.runs import RunDir


def disk_full(path: Path | str = "") -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def dot_leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(".") and p.name.endswith((".tmp", ".old"))]


def recipe_file(root: Path, model_dir: Path, extra: str = "") -> Path:
    tiny.write_jsonl(root / "data" / "train.jsonl", tiny.reverse_rows(24))
    (root / "recipe.yaml").write_text(
        f"name: faults\nmodel: {{base: {model_dir}}}\nlora: {{rank: 4, alpha: 8}}\n"
        "data:\n  train: [{path: data/train.jsonl}]\n  max_seq_length: 64\n"
        "train: {max_steps: 6, save_every: 2, batch_size: 4, gradient_checkpointing: false}\n"
        f"output_dir: {root / 'runs' / 'faults'}\n{extra}"
    )
    return root / "recipe.yaml"


def test_a_full_disk_in_an_atomic_write_names_the_file_and_keeps_the_old_one(tmp_path):
    final = tmp_path / "adapter"
    with atomic_dir(final) as tmp:
        (tmp / "weights").write_text("complete")
    before = snapshot(final)
    message = rf"could not write {final / 'weights'}: No space left on device; {final} is unchanged"
    with pytest.raises(WriteError, match=message), atomic_dir(final) as tmp:
        (tmp / "weights").write_text("parti")
        raise disk_full(tmp / "weights")
    assert snapshot(final) == before and dot_leftovers(tmp_path) == []


def test_a_failed_write_that_names_no_file_is_named_by_the_newest_file_being_written(tmp_path):
    """write() on a full disk raises ENOSPC without a filename: the file it was writing is still named."""
    final = tmp_path / "eval"
    message = rf"could not write {final / 'examples.jsonl'}: No space left on device"
    with pytest.raises(WriteError, match=message), atomic_dir(final) as tmp:
        (tmp / "summary.json").write_text("{}")
        os.utime(tmp / "summary.json", ns=(1, 1))
        (tmp / "examples.jsonl").write_text("half a li")
        raise disk_full()
    assert not final.exists() and dot_leftovers(tmp_path) == []


def test_a_full_disk_while_saving_the_adapter_keeps_the_previous_adapter(tmp_path):
    from finetune.train import _save_adapter

    class Model:
        def __init__(self, fail: bool):
            self.fail = fail

        def save_pretrained(self, folder, **kwargs):
            (Path(folder) / "adapter_model.safetensors").write_bytes(b"half" if self.fail else b"whole adapter")
            if self.fail:
                raise disk_full(Path(folder) / "adapter_model.safetensors")

    class Tokenizer:
        def save_pretrained(self, folder):
            (Path(folder) / "tokenizer.json").write_text("{}")

    run = RunDir(tmp_path / "run")
    recipe = load_recipe(recipe_file(tmp_path, tmp_path), check_files=False)
    _save_adapter(recipe, run, Model(fail=False), Tokenizer())
    before = snapshot(run.adapter)
    written = run.adapter / "adapter_model.safetensors"
    with pytest.raises(WriteError, match=rf"could not write {written}: No space left on device; .* is unchanged"):
        _save_adapter(recipe, run, Model(fail=True), Tokenizer())
    assert snapshot(run.adapter) == before and dot_leftovers(run.root) == []


def test_a_full_disk_while_writing_the_data_cache_warns_and_leaves_no_entry(
    tmp_path, tiny_model_dir, tiny_tokenizer_dir, monkeypatch
):
    from datasets import Dataset
    from transformers import AutoTokenizer

    from finetune.data.prepare import cache_root, prepare_data

    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    recipe = load_recipe(recipe_file(tmp_path, tiny_model_dir()))
    real = Dataset.save_to_disk

    def save_half(self, path, *args, **kwargs):
        real(self, path, *args, **kwargs)
        raise disk_full(Path(path) / "data-00000-of-00001.arrow")

    monkeypatch.setattr(Dataset, "save_to_disk", save_half)
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    with pytest.warns(UserWarning, match=r"could not write the data cache .*No space left on device.*going on"):
        prepared = prepare_data(recipe, tokenizer)
    assert prepared.stats.train_rows == 24
    assert list((cache_root() / "data").iterdir()) == []  # no entry, no temporary: nothing half-written to serve


@pytest.mark.slow
def test_a_full_disk_mid_checkpoint_stops_naming_it_and_keeps_the_last_complete_one(
    tmp_path, tiny_model_dir, monkeypatch
):
    """Training in-process: the third checkpoint's optimizer file fails half-written."""
    from finetune.methods.sft import FinetuneSFTTrainer
    from finetune.train import train

    recipe = load_recipe(recipe_file(tmp_path, tiny_model_dir()))
    real = FinetuneSFTTrainer._save_optimizer_and_scheduler

    def fail_at_step_6(self, output_dir):
        real(self, output_dir)
        if self.state.global_step == 6:
            raise disk_full(Path(output_dir) / "optimizer.pt")

    monkeypatch.setattr(FinetuneSFTTrainer, "_save_optimizer_and_scheduler", fail_at_step_6)
    with pytest.raises(WriteError) as e:
        train(recipe, progress=False)
    run = RunDir(recipe.run_dir)
    assert f"could not write {run.checkpoints / 'checkpoint-6' / 'optimizer.pt'}: No space left on device" in str(
        e.value
    )
    assert "the last complete checkpoint is kept" in str(e.value)
    assert [p.name for p in run.complete_checkpoints()] == ["checkpoint-2", "checkpoint-4"]
    assert not (run.checkpoints / ".staging" / "checkpoint-6").exists()
    manifest = json.loads(run.manifest.read_text())
    assert manifest["status"] == "failed" and "checkpoint-6" in manifest["error"]


@pytest.mark.slow
def test_a_full_disk_while_merging_names_the_output_and_writes_nothing(tmp_path, tiny_model_dir, monkeypatch):
    from transformers import PreTrainedModel

    from finetune.merge import merge
    from finetune.train import train

    recipe = load_recipe(recipe_file(tmp_path, tiny_model_dir()), ["train.max_steps=2", "train.save_every=null"])
    run = train(recipe, progress=False).run_dir
    out = tmp_path / "merged"
    real = PreTrainedModel.save_pretrained

    def save_half(self, folder, *args, **kwargs):
        real(self, folder, *args, **kwargs)
        raise disk_full(Path(folder) / "model.safetensors")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", save_half)
    message = rf"could not write {out / 'model.safetensors'}: No space left on device; nothing was written there"
    with pytest.raises(WriteError, match=message):
        merge(run, out=out)
    assert not out.exists() and dot_leftovers(tmp_path) == []


def test_a_read_only_run_directory_is_refused_before_any_work(tmp_path, monkeypatch):
    import tempfile

    run = RunDir(tmp_path / "run")
    real = tempfile.mkstemp

    def read_only(*args, dir=None, **kwargs):
        if dir is not None and Path(dir) == run.root:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(dir))
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    with pytest.raises(RunDirError, match=rf"run directory {run.root} is not writable: Read-only file system"):
        run.create(overwrite=False)


def test_an_unreadable_run_directory_is_named_on_resume(tmp_path, tiny_model_dir, monkeypatch):
    from finetune.train import find_resume_point

    recipe = load_recipe(recipe_file(tmp_path, tiny_model_dir()))
    run = RunDir(recipe.run_dir)
    run.root.mkdir(parents=True)
    run.recipe.write_text("name: faults\n")
    real = Path.read_text

    def unreadable(self, *args, **kwargs):
        if self == run.recipe:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", unreadable)
    with pytest.raises(RunDirError, match=rf"cannot read {run.recipe}: Permission denied"):
        find_resume_point(run, recipe)
