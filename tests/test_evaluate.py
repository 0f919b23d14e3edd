"""`mdfer evaluate --data NAME=PATH` (a run, or `--model` an exported file) on class folders that
were never part of the run, and flip test-time augmentation."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import run_mdfer
from mdfer.evaluate import evaluate_run, with_flip
from mdfer.layout import ONNX_FILE, TFLITE_FLOAT32
from mdfer.storage import Store


@pytest.fixture(scope="module")
def hostile_test_folder(trained_run: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The run's own FER2013 test images as class folders, plus what a user's disk holds: a text
    file, a corrupt JPEG, and a class folder the config does not map."""
    folder = tmp_path_factory.mktemp("newtest") / "fer2013-test"
    shutil.copytree(trained_run["root"] / "fer2013" / "test", folder)
    good = sum(1 for _ in folder.rglob("*.jpg"))
    (folder / "angry" / "notes.txt").write_text("not a picture")
    (folder / "happy" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut short")
    (folder / "contempt").mkdir()
    Image.fromarray(np.random.default_rng(3).integers(0, 255, (48, 48), dtype=np.uint8), "L").save(
        folder / "contempt" / "face.png")
    own = evaluate_run(trained_run["store"], "learn", "test")  # the run's own test split, scored once
    return {**trained_run, "folder": folder, "good": good, "own": own}


def _report(result_stdout: str, store: Store) -> tuple[dict, Path]:
    line = next(line for line in result_stdout.splitlines() if line.startswith("report: "))
    report = Path(line[len("report: "):].rstrip("/"))
    return json.loads((report / "metrics.json").read_text()), report


def test_run_on_folders_scores_like_its_own_split_and_lists_every_bad_file(hostile_test_folder):
    data, store = hostile_test_folder, hostile_test_folder["store"]
    done = run_mdfer("evaluate", "--store", store.uri, "--run-id", "learn",
                     "--data", f"fer2013={data['folder']}")
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "rejected fer2013: angry/notes.txt: not an image" in out
    assert "rejected fer2013: happy/broken.jpg: truncated or corrupt image" in out
    assert "rejected fer2013: contempt/face.png: unknown class folder 'contempt'" in out
    assert f"scanned {data['good'] + 3} = accepted {data['good']} + rejected 3 + duplicates 0" in out
    metrics, report = _report(out, store)
    assert set(metrics["heads"]) == {"fer2013", "domain"}  # fane was not given: not scored, not shown
    assert metrics["heads"]["fer2013"]["n"] == metrics["heads"]["domain"]["n"] == data["good"]
    assert {"confusion_fer2013.png", "confusion_domain.png", "metrics.json"} <= {p.name for p in report.iterdir()}
    assert str(report).startswith(store.path("runs/learn/report/data-ds-"))
    # the same images as the run's own test split (its FER2013 part): the same confusion matrices,
    # the domain head included (its index is the run's, not the new dataset's)
    own = data["own"]
    assert metrics["heads"]["fer2013"]["confusion"] == own["heads"]["fer2013"]["confusion"]
    domain_rows = np.asarray(own["heads"]["domain"]["confusion"])[0]
    assert np.asarray(metrics["heads"]["domain"]["confusion"])[0].tolist() == domain_rows.tolist()


def test_exported_models_on_folders_local_and_s3(exported, hostile_test_folder, s3_env, s3_prefix):
    """.tflite on a local folder, .onnx on the same folder in S3: the same scores as the Keras run."""
    store, folder = exported["store"], hostile_test_folder["folder"]
    source = Store(f"{s3_prefix}/newtest")
    for path in folder.rglob("*"):
        if path.is_file():
            source.write_bytes(str(path.relative_to(folder)), path.read_bytes())
    own = hostile_test_folder["own"]["heads"]["fer2013"]
    for model, where in ((TFLITE_FLOAT32, str(folder)), (ONNX_FILE, source.uri)):
        done = run_mdfer("evaluate", "--store", store.uri, "--model", str(exported["folder"] / model),
                         "--data", f"fer2013={where}")
        assert done.returncode == 0, done.stderr[-3000:]
        assert "rejected fer2013: contempt/face.png: unknown class folder 'contempt'" in done.stdout
        metrics, report = _report(done.stdout, store)
        assert str(report).startswith(store.path(f"evaluations/{Path(model).stem}-"))
        fer = metrics["heads"]["fer2013"]
        assert fer["n"] == own["n"]
        # float32 exports match Keras to 1e-5: at most a near-tie may flip
        assert abs(fer["accuracy"] - own["accuracy"]) <= 1 / own["n"], (model, fer["accuracy"], own["accuracy"])


def test_folder_map_and_flip_tta(exported, hostile_test_folder, tmp_path):
    """--config maps a folder the class names do not (contempt -> angry); --flip-tta reports apart."""
    import yaml
    raw = yaml.safe_load(Path(exported["config"]).read_text())
    raw["data"]["domains"][0]["folders"]["contempt"] = "angry"
    config = tmp_path / "mapped.yaml"
    config.write_text(yaml.safe_dump(raw))
    done = run_mdfer("evaluate", "--store", exported["store"].uri, "--model",
                     str(exported["folder"] / TFLITE_FLOAT32), "--config", str(config),
                     "--data", f"fer2013={hostile_test_folder['folder']}", "--flip-tta")
    assert done.returncode == 0, done.stderr[-3000:]
    metrics, report = _report(done.stdout, exported["store"])
    assert metrics["flip_tta"] is True and report.name.endswith("-flip")
    assert metrics["heads"]["fer2013"]["n"] == hostile_test_folder["good"] + 1
    assert metrics["heads"]["fer2013"]["per_class"]["angry"]["support"] == len(
        list((hostile_test_folder["folder"] / "angry").glob("*.jpg"))) + 1


@pytest.mark.parametrize("case", ["dataset root", "unknown dataset", "model without data", "no heads.json",
                                  "missing folder", "data twice", "split with data"])
def test_bad_evaluate_input_is_one_clear_line(exported, tmp_path, capsys, case):
    """In-process (each is refused before a model loads): exit 2, one line naming what is wrong."""
    from mdfer.cli import main
    store, model = exported["store"].uri, str(exported["folder"] / TFLITE_FLOAT32)
    root = exported["root"] / "fer2013"  # holds train/ and test/, not class folders
    lonely = tmp_path / "lonely.tflite"
    shutil.copy(model, lonely)
    args, expected = {
        "dataset root": (["--run-id", "learn", "--data", f"fer2013={root}"],
                         f"--data fer2013={root}: no class folder of fer2013 in it (found test, train;"),
        "unknown dataset": (["--model", model, "--data", f"sfew={root / 'test'}"],
                            "--data sfew=...: the model has no dataset 'sfew' (it has fer2013, fane)"),
        "model without data": (["--model", model], "--model needs --data NAME=PATH"),
        "no heads.json": (["--model", str(lonely), "--data", f"fer2013={root / 'test'}"],
                          "lonely.tflite: no heads.json beside it"),
        "missing folder": (["--run-id", "learn", "--data", f"fer2013={tmp_path / 'nope'}"],
                           f"--data fer2013={tmp_path / 'nope'}: not a folder"),
        "data twice": (["--run-id", "learn", "--data", f"fer2013={root}", "--data", f"fer2013={root}"],
                       "--data fer2013=...: given twice"),
        "split with data": (["--run-id", "learn", "--split", "val", "--data", f"fer2013={root}"],
                            "--split and --inference-lowpass score a run's own dataset"),
    }[case]
    assert main(["evaluate", "--store", store, *args]) == 2
    stderr = capsys.readouterr().err
    assert stderr.strip().count("\n") == 0 and expected in stderr, stderr


def test_flip_tta_averages_each_image_with_its_mirror():
    """A deliberately asymmetric 'model' (left half vs right half): its flip average is exactly the
    mean of the two views, and on a mirror-symmetric image it changes nothing."""
    def lopsided(images: np.ndarray) -> dict[str, np.ndarray]:
        half = images.shape[2] // 2
        score = images[:, :, :half].mean(axis=(1, 2, 3)) - images[:, :, half:].mean(axis=(1, 2, 3))
        logits = np.stack([score, -score], axis=1)
        return {"head": np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)}

    images = np.random.default_rng(0).uniform(0, 1, (3, 8, 8, 3)).astype(np.float32)
    averaged = with_flip(lopsided)(images)["head"]
    expected = (lopsided(images)["head"] + lopsided(images[:, :, ::-1])["head"]) / 2
    np.testing.assert_allclose(averaged, expected, rtol=1e-6)
    np.testing.assert_allclose(averaged, 0.5, rtol=1e-6)  # the two views cancel exactly here
    symmetric = np.concatenate([images[:, :, :4], images[:, :, :4][:, :, ::-1]], axis=2)
    np.testing.assert_allclose(with_flip(lopsided)(symmetric)["head"], lopsided(symmetric)["head"], rtol=1e-6)
