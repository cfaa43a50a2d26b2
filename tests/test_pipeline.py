"""The pipeline through the CLI on a tiny world, and its one-line errors."""

import json

import numpy as np
import pytest

from clipkd.cli import main
from clipkd.demo import run_demo


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return out, run_demo(out, quick=True, device="cpu")


def test_quick_demo_end_to_end(demo_run):
    out, results = demo_run
    saved = json.loads((out / "results.json").read_text())
    assert saved["teacher"].keys() >= {"S", "U", "H", "top1"}
    assert set(saved["students"]) == {"embed", "embed_label", "cutmix_fm", "supervised"}
    for r in [saved["teacher"], *saved["students"].values()]:
        for k in ("S", "U", "H", "top1"):
            assert 0.0 <= r[k] <= 1.0
    assert saved["students"]["supervised"]["U"] == 0.0  # a closed-set classifier cannot name unseen classes
    assert saved["seconds"] > 0
    for f in ("report.md", "gzsl_curves.png", "gzsl_bars.png", "students/embed/training_curves.png",
              "students/embed/student.pt", "store/manifest.json", "teacher/open_clip_model.pt"):
        assert (out / f).is_file(), f


def test_second_run_reuses_teacher_and_resumes_students(demo_run, caplog):
    out, first = demo_run
    with caplog.at_level("INFO", logger="clipkd"):
        again = run_demo(out, quick=True, device="cpu")
    assert "reusing the trained demo teacher" in caplog.text
    assert again["teacher"]["H"] == pytest.approx(first["teacher"]["H"])
    assert again["students"]["embed"]["H"] == pytest.approx(first["students"]["embed"]["H"])


def test_a_copied_demo_folder_loads_its_own_teacher_and_names_no_path_of_the_first(demo_run, tmp_path, caplog):
    """A demo folder copied elsewhere reuses the teacher that came with it: named by its run folder (the weights file
    inside it), never by the absolute spec the first run's run.json recorded."""
    import shutil

    out, first = demo_run
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)
    with caplog.at_level("INFO", logger="clipkd"):
        again = run_demo(moved, quick=True, device="cpu")
    assert "reusing the trained demo teacher" in caplog.text
    assert again["teacher"]["spec"] == str(moved / "teacher")
    assert str(out) not in (moved / "results.json").read_text()
    assert again["teacher"]["H"] == pytest.approx(first["teacher"]["H"])


def test_cli_eval_and_predict(demo_run, capsys, tmp_path):
    out, _ = demo_run
    world = out / "world"
    args = ["eval", "--model", str(out / "students" / "embed"), "--images", str(world / "test"),
            "--text", str(out / "text_embeddings.npz"), "--split", str(world / "split.json"),
            "--out", str(tmp_path / "eval.json"), "--device", "cpu"]
    assert main(args) == 0
    r = json.loads((tmp_path / "eval.json").read_text())
    assert {"S", "U", "H", "calibrated", "ausuc", "top5", "per_class_top1"} <= set(r)
    assert (tmp_path / "eval.png").is_file()
    img = next((world / "test").rglob("*.png"))
    capsys.readouterr()
    assert main(["predict", "--model", str(out / "students" / "embed"), "--text", str(out / "text_embeddings.npz"),
                 "--topk", "3", "--device", "cpu", str(img), str(tmp_path / "eval.json")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0].count(",") == 2 and "skipped" in lines[1]
    probs = [float(p.rsplit(" ", 1)[1]) for p in lines[0].split(": ", 1)[1].split(", ")]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001
    # a clip-train run folder is a model too (its run.json names the spec)
    spec = json.loads((out / "teacher" / "run.json").read_text())["spec"]
    kw = dict(text=out / "text_embeddings.npz", split=world / "split.json", device="cpu", progress=False)
    from clipkd.evaluation.zeroshot import evaluate

    assert evaluate(str(out / "teacher"), world / "test", **kw).H == evaluate(spec, world / "test", **kw).H


def _one_line_error(capsys, argv, needle):
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err


def test_cli_errors_are_one_line(demo_run, capsys, tmp_path):
    out, _ = demo_run
    world = out / "world"
    (tmp_path / "empty").mkdir()
    _one_line_error(capsys, ["embed-images", "--teacher", "open_clip:clipkd-tiny@" + str(out / "teacher" /
                    "open_clip_model.pt"), "--images", str(tmp_path / "empty"), "--out", str(tmp_path / "s"),
                    "--device", "cpu"], "no image files")
    bad_split = tmp_path / "split.json"
    bad_split.write_text(json.dumps({"seen": ["red circle", "plaid hexagon"], "unseen": []}))
    _one_line_error(capsys, ["eval", "--model", str(out / "students" / "embed"), "--images", str(world / "test"),
                             "--text", str(out / "text_embeddings.npz"), "--split", str(bad_split), "--device",
                             "cpu"], "plaid hexagon")
    # text embeddings of another size than the student's
    from clipkd.prompts import TextEmbeddings

    t = TextEmbeddings.load(out / "text_embeddings.npz")
    TextEmbeddings(np.ones((len(t.classnames), 7), np.float32), t.classnames, t.teacher).save(tmp_path / "t7.npz")
    _one_line_error(capsys, ["eval", "--model", str(out / "students" / "embed"), "--images", str(world / "test"),
                             "--text", str(tmp_path / "t7.npz"), "--device", "cpu"], "size")
    _one_line_error(capsys, ["distill", "--student", "resnet10t", "--images", str(world / "train"),
                             "--store", str(out / "store"), "--text", str(tmp_path / "t7.npz"), "--label-weight",
                             "1", "--out", str(tmp_path / "run"), "--device", "cpu"], "size")
    _one_line_error(capsys, ["distill", "--student", "no_such_net", "--images", str(world / "train"),
                             "--store", str(out / "store"), "--out", str(tmp_path / "run2"), "--device", "cpu"],
                    "timm has no model")


def test_distill_with_online_teacher_and_resume(demo_run, tmp_path):
    """--teacher runs the teacher per batch on the student's augmented view; a finished run resumes as a no-op."""
    from clipkd.students.model import load_student
    from clipkd.training.distill import TrainConfig, distill

    out, _ = demo_run
    world = out / "world"
    spec = json.loads((out / "teacher" / "run.json").read_text())["spec"]
    cfg = TrainConfig(student="resnet10t", epochs=1, batch_size=16, workers=0, terms={"embed": 1.0, "label": 0.5})
    path = distill(world / "train", tmp_path / "online", cfg, teacher=spec, text=out / "text_embeddings.npz",
                   split=world / "split.json", device="cpu", progress=False).path
    run = json.loads((tmp_path / "online" / "run.json").read_text())
    assert run["targets"] == "online" and set(run["seen_classes"]).isdisjoint(
        json.loads((world / "split.json").read_text())["unseen"])
    first = load_student(path).state_dict()
    distill(world / "train", tmp_path / "online", cfg, teacher=spec, text=out / "text_embeddings.npz",
            split=world / "split.json", device="cpu", progress=False)
    again = load_student(path).state_dict()
    assert all(np.array_equal(first[k].numpy(), again[k].numpy()) for k in first)


def test_quick_retrieval_demo_reuses_world_and_teacher(demo_run, tmp_path, caplog):
    out, _ = demo_run
    with caplog.at_level("INFO", logger="clipkd"):
        r = run_demo(tmp_path / "retrieval", quick=True, device="cpu", task="retrieval", shared=out)
    assert "reusing the trained demo teacher" in caplog.text
    saved = json.loads((tmp_path / "retrieval" / "results.json").read_text())
    assert set(saved["students"]) == {"no_kd", "cosine", "mse", "affinity", "distilled"}
    for row in [saved["teacher"], *saved["students"].values()]:
        assert 0.0 <= row["i2i_map@10"] <= 1.0 and 0.0 <= row["t2i_r@1"] <= 1.0
    assert saved["student_cost"]["image_mflops"] < saved["teacher"]["cost"]["image_mflops"]
    # the distilled search student: a reparameterizable clipkd_rep_s (measured folded), trained from a store of views
    # with no teacher pass of its own, text queries through the teacher's text tower (t2i measured, so it has one)
    assert saved["distilled_cost"]["image_mflops"] < saved["student_cost"]["image_mflops"]
    assert saved["compute"]["distilled"]["teacher_images"] == 2 * len(list((out / "world" / "train").rglob("*.png")))
    run = json.loads((tmp_path / "retrieval" / "students" / "distilled" / "run.json").read_text())
    assert run["targets"] == "views" and run["teacher_images"] == 0
    assert saved["index"]["student"] in saved["students"]
    assert r["students"]["cosine"] == saved["students"]["cosine"]
    for f in ("report.md", "retrieval_bars.png", "eval/teacher.png", "students/mse/open_clip_model.pt"):
        assert (tmp_path / "retrieval" / f).is_file(), f
    # the demo ends with a search index built by the best retrieval student, and says how to serve it
    best = max(saved["students"], key=lambda n: saved["students"][n]["i2i_map@10"])
    assert saved["index"]["student"] == best and saved["index"]["images"] > 0
    report = (tmp_path / "retrieval" / "report.md").read_text()
    assert "| speed-up |" in report and f"(eval/{best}.png)" in report  # costs per row; the best student's grid
    assert (tmp_path / "retrieval" / "eval" / f"{best}.png").is_file()
    from clipkd.search.index import SearchIndex

    assert len(SearchIndex(saved["index"]["path"])) == saved["index"]["images"]
    assert f"clipkd serve --index {tmp_path / 'retrieval' / 'index'}" in caplog.text
