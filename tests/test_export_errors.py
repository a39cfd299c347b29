"""`cardkit export` refuses a bad --out in one line, before any work, and never leaves a
half-written or hidden temporary file; an existing file is replaced only with --force."""

from pathlib import Path

import pytest

import cardkit
from cardkit.cli import main
from cardkit.compress.artifact import save_artifact
from cardkit.engine.checkpoint import save_checkpoint
from cardkit.errors import CardkitError
from cardkit.models import create_model


@pytest.fixture
def run(tmp_path):
    """A checkpoint folder of a small dense model, as the pipeline writes one."""
    model = create_model("cnn_small", 10, 1, 8)
    folder = tmp_path / "run" / "checkpoints"
    save_checkpoint(folder, model_state=model.state_dict(),
                    meta={"stage": "pretrain", "state": {"epoch": 1, "step": 1}, "arch": model.arch})
    return folder


def export(capsys, *args):
    code = main(["export", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line(err: str) -> str:
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def everything(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.parametrize("fmt", ["card", "onnx"])
def test_out_that_is_a_folder_is_refused_and_nothing_is_written(run, tmp_path, capsys, fmt):
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
    out = tmp_path / "exports"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    code, _, err = export(capsys, "--checkpoint", run, "--out", out, "--format", fmt)
    assert code == 2
    assert f"'{out}' is a folder" in one_line(err) and "model.card" in err
    assert everything(out) == ["keep.txt"]  # no hidden .tmp file left behind


def test_out_below_a_file_is_refused(run, tmp_path, capsys):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("x")
    code, _, err = export(capsys, "--checkpoint", run, "--out", blocker / "x.card")
    assert code == 2
    assert f"'{blocker}' is a file, not a folder" in one_line(err)
    assert blocker.read_text() == "x" and everything(tmp_path).count("notes.txt") == 1


def test_existing_out_is_kept_unless_forced(run, tmp_path, capsys):
    out = tmp_path / "model.card"
    out.write_bytes(b"an earlier result")
    code, _, err = export(capsys, "--checkpoint", run, "--out", out)
    assert code == 2
    assert "already exists" in one_line(err) and "--force" in err
    assert out.read_bytes() == b"an earlier result"

    code, printed, err = export(capsys, "--checkpoint", run, "--out", out, "--force")
    assert code == 0 and err == "" and f"wrote {out}" in printed
    cardkit.load_artifact(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.card", "run"]


def test_a_new_out_in_a_new_folder_is_written(run, tmp_path, capsys):
    out = tmp_path / "new" / "folder" / "model.card"
    code, printed, err = export(capsys, "--checkpoint", run, "--out", out)
    assert code == 0 and err == ""
    assert everything(tmp_path / "new") == ["folder", "folder/model.card"]


def test_a_failed_write_leaves_neither_the_file_nor_a_temporary(tmp_path, monkeypatch):
    model = create_model("cnn_small", 10, 1, 8)

    def refuse(self, target):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "replace", refuse)
    with pytest.raises(OSError, match="No space"):
        save_artifact(model, tmp_path / "m.card")
    assert list(tmp_path.iterdir()) == []


def test_save_artifact_to_a_folder_is_one_line(tmp_path):
    with pytest.raises(CardkitError, match="is a folder"):
        save_artifact(create_model("cnn_small", 10, 1, 8), tmp_path)
    assert list(tmp_path.iterdir()) == []
