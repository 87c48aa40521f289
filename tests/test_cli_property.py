"""Random options of every subcommand (Hypothesis): exit 0, or exit 2 with an error line and
no traceback; and no file outside the command's output changes (issue 33)."""

from __future__ import annotations

import hashlib
import math
import shutil
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from napari_rmt.cli import main  # noqa: E402

NUMBERS = st.one_of(
    st.integers(-3, 5).map(str),
    st.floats(allow_nan=True, allow_infinity=True, width=32).map(lambda v: "nan" if math.isnan(v) else repr(v)),
    st.sampled_from(["0", "1", "0.5", "abc", "", "1e9", "-0.0"]),
)


def option(name: str, values=NUMBERS):
    return st.tuples(st.just(name), values)


TRAIN_OPTIONS = [
    option("--iterations"), option("--burn-in"), option("--lr"), option("--threshold"), option("--batch"),
    option("--teacher-views"), option("--focal-gamma"), option("--ignore-low"), option("--lambda-u"),
    option("--partial-stain-ignore"), option("--class-balance"), option("--class-weight-beta"),
    option("--minutes"), option("--warmup"), option("--holdout"),
    option("--method", st.sampled_from(["supervised", "rmt", "rmt+", "stac", "ubt", "fixmatch"])),
    option("--preset", st.sampled_from(["recipe", "paper", "fast"])),
    option("--pseudo-rule", st.sampled_from(["fixed", "gmm", "topk", "nope"])),
]
PREDICT_OPTIONS = [
    option("--score-threshold"), option("--nms"), option("--batch-size"), option("--window"), option("--context"),
    option("--box-score", st.sampled_from(["class", "foreground", "other"])),
]
EVALUATE_OPTIONS = [
    option("--iou"), option("--radius"), option("--score-threshold"),
    option("--match", st.sampled_from(["iou", "centre", "box"])),
]


def snapshot(folder: Path, skip: Path) -> dict[str, str]:
    return {
        str(p): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in folder.rglob("*")
        if p.is_file() and not p.is_relative_to(skip)
    }


def run_and_judge(argv: list[str], root: Path, out: Path, capsys) -> None:
    before = snapshot(root, out)
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse's refusal: usage and one error line, status 2
        rc = exc.code
    err = capsys.readouterr().err
    assert rc in (0, 2), (argv, rc, err)
    assert "Traceback" not in err, (argv, err)
    if rc == 2:
        assert any("error:" in line for line in err.splitlines()), (argv, err)
    assert snapshot(root, out) == before, argv  # nothing outside the output changed


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from conftest import make_coco

    root = tmp_path_factory.mktemp("prop")
    coco = make_coco(root / "data", n_images=4, size=(64, 64))
    model = root / "model"
    assert main(["train", "--coco", str(coco), "--method", "supervised", "--iterations", "1", "--warmup", "1",
                 "--batch", "1", "--out", str(model)]) == 0
    return root, coco, model


COMMON = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@COMMON
@given(st.lists(st.one_of(*TRAIN_OPTIONS), max_size=4))
def test_train_with_random_options(workspace, capsys, opts):
    root, coco, _ = workspace
    out = root / "out_train"
    shutil.rmtree(out, ignore_errors=True)
    opts = [("--iterations", "1"), ("--minutes", "0.05"), *opts]  # every run short
    argv = ["train", "--coco", str(coco), *[x for pair in opts for x in pair], "--out", str(out)]
    run_and_judge(argv, root, out, capsys)


@COMMON
@given(st.lists(st.one_of(*PREDICT_OPTIONS), max_size=4))
def test_predict_with_random_options(workspace, capsys, opts):
    root, coco, model = workspace
    out = root / "out_predict"
    shutil.rmtree(out, ignore_errors=True)
    argv = ["predict", "--model", str(model), "--coco", str(coco), *[x for pair in opts for x in pair],
            "--out", str(out / "p.json")]
    run_and_judge(argv, root, out, capsys)


@COMMON
@given(st.lists(st.one_of(*EVALUATE_OPTIONS), max_size=4))
def test_evaluate_with_random_options(workspace, capsys, opts):
    root, coco, model = workspace
    out = root / "out_evaluate"
    shutil.rmtree(out, ignore_errors=True)
    pred = root / "pred.json"
    if not pred.exists():
        assert main(["predict", "--model", str(model), "--coco", str(coco), "--out", str(pred)]) == 0
    argv = ["evaluate", "--gt", str(coco), "--pred", str(pred), *[x for pair in opts for x in pair],
            "--json", str(out / "e.json")]
    run_and_judge(argv, root, out, capsys)


EXPERIMENT_OPTIONS = [
    option("--fractions"), option("--seeds", st.sampled_from(["0", "1", "-1", "x"])), option("--split-seed"),
    option("--eval-score-threshold"), option("--burn-in"), option("--lr"), option("--threshold"),
    option("--teacher-views"), option("--pixel-size"),
    option("--methods", st.sampled_from(["supervised", "stac", "rmt+", "fixmatch"])),
    option("--preset", st.sampled_from(["recipe", "paper", "fast"])),
]
DEMO_OPTIONS = [option("--iterations"), option("--init", st.sampled_from(["nucleus", "none", "imagenet"]))]


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(*EXPERIMENT_OPTIONS), max_size=3))
def test_experiment_with_random_options(workspace, capsys, opts):
    root, coco, _ = workspace
    out = root / "out_experiment"
    shutil.rmtree(out, ignore_errors=True)
    opts = [("--iterations", "1"), ("--minutes", "0.02"), ("--fractions", "0.5"), ("--methods", "supervised"), *opts]
    argv = ["experiment", "--coco", str(coco), *[x for pair in opts for x in pair], "--out", str(out)]
    run_and_judge(argv, root, out, capsys)


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(*DEMO_OPTIONS), max_size=2))
def test_demo_with_random_options(workspace, capsys, opts):
    root, _, _ = workspace
    out = root / "out_demo"
    shutil.rmtree(out, ignore_errors=True)
    opts = [("--iterations", "1"), *opts]
    if any(k == "--iterations" and v not in ("0", "1", "") for k, v in opts[1:]):
        opts = [(k, v) for k, v in opts if k != "--iterations"] + [("--iterations", "1")]  # every run short
    argv = ["demo", *[x for pair in opts for x in pair], "--out", str(out)]
    run_and_judge(argv, root, out, capsys)


@pytest.mark.parametrize("opt", ["--split-seed", "--seeds"])
def test_experiment_refuses_a_negative_seed_by_name(workspace, capsys, opt):
    """Found by the random options above: ``--split-seed -1`` reached numpy's seeding and died
    with its ValueError. A seed is 0 or more, and the refusal names the option."""
    root, coco, _ = workspace
    out = root / "out_experiment"
    with pytest.raises(SystemExit) as exc:
        main(["experiment", "--coco", str(coco), "--out", str(out), "--iterations", "1", opt, "-1"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and opt in err and "-1 must be at least 0" in err
