import json
import math

import numpy as np
import pandas as pd
import pytest

from medssl_kit.cli import main
from medssl_kit.errors import MedsslError
from medssl_kit.evaluate.classification import (
    auroc_markdown,
    auroc_table,
    load_classifier_predictions,
    paired_auroc_difference,
)
from medssl_kit.evaluate.metrics import auroc
from medssl_kit.evaluate.report import (
    SMOKE_NOTE,
    comparison_table,
    load_run_summaries,
    profile_notes,
    ranking,
    run_profiles,
    split_classes,
    to_markdown,
    wall_time_table,
)
from medssl_kit.evaluate.results import paired_wilcoxon, write_results


def _rows(seeds=(0, 1, 2)):
    rows = []
    for method, gain in (("scratch", 0.0), ("ssl", 0.05)):
        for seed in seeds:
            for case_index in range(4):
                for class_id, name, base in ((1, "liver", 0.8), (2, "spleen", 0.6),
                                             (7, "liver_lesion", 0.1)):  # fmt: skip
                    dice = base + gain + 0.01 * case_index + 0.002 * seed
                    rows.append(dict(method=method, backbone="unet", dims=2, labeled=1,
                                     seed=seed, case=f"c{case_index}", class_id=class_id,
                                     **{"class": name}, dice=dice, hd95=10 - 10 * gain,
                                     iou=dice))  # fmt: skip
    return pd.DataFrame(rows)


def test_split_classes():
    assert split_classes({0: "bg", 1: "liver", 7: "liver_lesion", 8: "Tumour"}) == ([1], [7, 8])


def test_comparison_table_values_and_p():
    df = _rows()
    table = comparison_table(df, organs=[1, 2], lesions=[7])
    ssl = table[table["method"] == "ssl"].iloc[0]
    scratch = table[table["method"] == "scratch"].iloc[0]
    # organ mean per seed = mean over cases of (0.8+0.6)/2 + 0.015 + 0.002*seed; then over seeds
    assert scratch["organ_dice"] == pytest.approx(0.7 + 0.015 + 0.002)
    assert ssl["organ_dice"] - scratch["organ_dice"] == pytest.approx(0.05)
    assert ssl["organ_dice_sd"] == pytest.approx(0.002)
    assert ssl["lesion_dice"] == pytest.approx(0.15 + 0.015 + 0.002)
    assert ssl["organ_hd95"] == pytest.approx(9.5)
    expected = paired_wilcoxon(df, "ssl", "scratch", "dice", 1, classes=[1, 2])
    assert ssl["p_vs_scratch"] == pytest.approx(expected["p_value"])
    assert ssl["n_pairs"] == 12 and expected["p_value"] < 0.01
    assert math.isnan(scratch["p_vs_scratch"])
    text = to_markdown(table)
    assert "| ssl | 1 | 0.767 ± 0.002 |" in text and text.count("\n") == 3
    assert (ssl["seeds_ahead"], ssl["n_paired_seeds"]) == (3, 3)
    assert math.isnan(ssl["p_seeds_vs_scratch"])  # three seeds cannot give a seed-level p
    assert f"| {ssl['p_vs_scratch']:.3g} | – | 3/3 | 3 |" in text
    assert "| – | – | – | 3 |" in text  # the baseline: no p, no count
    saved = table.drop(columns=["p_seeds_vs_scratch", "seeds_ahead", "n_paired_seeds"])
    older = to_markdown(saved)  # a table saved before these columns
    assert "| ssl | 1 |" in older and "3/3" not in older


def test_comparison_table_tests_over_seeds_from_six_seeds():
    df = _rows(seeds=range(6))
    table = comparison_table(df, organs=[1, 2])
    ssl = table[table["method"] == "ssl"].iloc[0]
    expected = paired_wilcoxon(df, "ssl", "scratch", "dice", 1, classes=[1, 2], unit="seed")
    assert expected["n_pairs"] == 6 and expected["p_value"] == pytest.approx(2 / 2**6)
    assert ssl["p_seeds_vs_scratch"] == pytest.approx(expected["p_value"])
    assert ssl["p_vs_scratch"] < ssl["p_seeds_vs_scratch"]  # 24 pairs against 6 seeds
    assert f"| {ssl['p_vs_scratch']:.3g} | 0.0312 | 6/6 | 6 |" in to_markdown(table)


def test_seeds_ahead_counts_per_seed_means_not_pairs():
    # ssl is ahead on every case of seed 0 but far behind on the 4th case of seeds 1 and 2:
    # most pairs favour it, yet its per-seed mean is ahead on seed 0 only.
    df = _rows()
    ssl = (df["method"] == "ssl") & (df["class_id"] != 7)
    df.loc[ssl, "dice"] = df.loc[ssl, "dice"] - 0.04  # +0.01 on every pair
    sunk = ssl & (df["case"] == "c3") & df["seed"].isin([1, 2])
    df.loc[sunk, "dice"] = df.loc[sunk, "dice"] - 0.2
    args = (df, "ssl", "scratch", "dice", 1)
    by_seed = paired_wilcoxon(*args, classes=[1, 2], unit="seed")
    assert (by_seed["n_ahead"], by_seed["n_pairs"]) == (1, 3)
    by_case = paired_wilcoxon(*args, classes=[1, 2])
    assert (by_case["n_ahead"], by_case["n_pairs"]) == (10, 12)  # what the pairs say
    assert by_case["median_difference"] > 0
    assert comparison_table(df, organs=[1, 2]).query("method == 'ssl'")["seeds_ahead"].item() == 1
    df2 = df[~((df["method"] == "ssl") & (df["seed"] == 2))]
    by_seed2 = paired_wilcoxon(df2, "ssl", "scratch", "dice", 1, classes=[1, 2], unit="seed")
    assert (by_seed2["n_ahead"], by_seed2["n_pairs"]) == (1, 2)


def test_cli_report(tmp_path, capsys):
    df = _rows()
    for method, part in df.groupby("method"):
        write_results(part.to_dict("records"), tmp_path / method / "results.csv")
    assert main(["report", str(tmp_path), "--csv", str(tmp_path / "table.csv")]) == 0
    out = capsys.readouterr().out
    assert "| scratch | 1 |" in out and "lesion Dice" in out
    assert main(["report", str(tmp_path / "ssl" / "results.csv")]) == 0  # a file works too
    assert "| ssl | 1 |" in capsys.readouterr().out
    assert len(pd.read_csv(tmp_path / "table.csv")) == 2


def _runs_with_profiles(root, profiles):
    """One fine-tuning run folder per method (results.csv + config.json at ``profiles[method]``)
    and a pre-training run at the smoke profile, which holds no numbers of the table."""
    df = _rows()
    for method, part in df.groupby("method"):
        run = root / method / "labeled-1_seed-0"
        write_results(part.to_dict("records"), run / "results.csv")
        config = {"kind": "finetune", "method": method, "config": {"profile": profiles[method]}}
        (run / "config.json").write_text(json.dumps(config))
    (root / "pretrain").mkdir()
    pretrain = {"kind": "pretrain", "config": {"profile": "smoke"}}
    (root / "pretrain" / "config.json").write_text(json.dumps(pretrain))


def test_smoke_profile_runs_get_a_note(tmp_path):
    _runs_with_profiles(tmp_path / "smoke", {"scratch": "smoke", "ssl": "smoke"})
    assert set(run_profiles(tmp_path / "smoke").values()) == {"smoke"}
    assert len(run_profiles(tmp_path / "smoke")) == 2  # the pre-training run is not counted
    assert profile_notes(tmp_path / "smoke") == [f"These are smoke-profile runs. {SMOKE_NOTE}"]
    one_file = tmp_path / "smoke" / "ssl" / "labeled-1_seed-0" / "results.csv"
    assert profile_notes([one_file]) == profile_notes(tmp_path / "smoke")

    _runs_with_profiles(tmp_path / "cpu", {"scratch": "cpu", "ssl": "cpu"})
    assert profile_notes(tmp_path / "cpu") == []
    _runs_with_profiles(tmp_path / "mixed", {"scratch": "cpu", "ssl": "smoke"})
    (tmp_path / "mixed" / "stray").mkdir()
    (tmp_path / "mixed" / "stray" / "config.json").write_text("{not json")  # not a run: skipped
    (note,) = profile_notes(tmp_path / "mixed")
    assert note.startswith("1 of these 2 fine-tuning runs are smoke-profile runs. ")


def test_cli_report_says_smoke_numbers_only_show_the_pipeline_runs(tmp_path, capsys):
    _runs_with_profiles(tmp_path / "smoke", {"scratch": "smoke", "ssl": "smoke"})
    assert main(["report", str(tmp_path / "smoke")]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"> Note: These are smoke-profile runs. {SMOKE_NOTE}\n\n| method |")
    _runs_with_profiles(tmp_path / "cpu", {"scratch": "cpu", "ssl": "cpu"})
    assert main(["report", str(tmp_path / "cpu")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("| method |") and "smoke" not in out


def test_ranking_per_budget_dice_high_hd95_low():
    table = pd.DataFrame(
        {
            "labeled": [1, 1, 1, 4, 4],
            "method": ["a", "b", "c", "a", "b"],
            "organ_dice": [0.5, 0.7, 0.7, 0.9, 0.8],
            "organ_hd95": [30.0, 10.0, 20.0, 5.0, 6.0],
        }
    )
    ranks = ranking(table)
    at1 = ranks[ranks["labeled"] == 1].set_index("method")["rank"].to_dict()
    assert at1 == {"b": 1, "c": 1, "a": 3}  # ties share the best rank
    at4 = ranks[ranks["labeled"] == 4]
    assert list(at4["method"]) == ["a", "b"] and list(at4["rank"]) == [1, 2]
    by_hd95 = ranking(table, "organ_hd95")
    assert by_hd95[by_hd95["labeled"] == 1].iloc[0]["method"] == "b"


def test_run_summaries_and_wall_times(tmp_path):
    import json

    def summary(folder, **values):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "summary.json").write_text(json.dumps(values))

    summary("pre/ssl", method="ssl", steps=100, wall_time_s=300.0)
    summary("ft/ssl/l1_s0", method="ssl", labeled=1, seed=0, steps_run=50, wall_time_s=10.0)
    summary("ft/ssl/l1_s1", method="ssl", labeled=1, seed=1, steps_run=50, wall_time_s=14.0)
    summary("ft/scratch/l1_s0", method="scratch", labeled=1, seed=0, wall_time_s=12.0)
    runs = load_run_summaries(tmp_path)
    assert sorted(runs["kind"]) == ["finetune"] * 3 + ["pretrain"]
    times = wall_time_table(runs).set_index("method")
    assert times.loc["ssl", "pretrain_s"] == 300.0 and times.loc["ssl", "finetune_runs"] == 2
    assert times.loc["ssl", "finetune_mean_s"] == 12.0 and times.loc["ssl", "total_s"] == 324.0
    assert math.isnan(times.loc["scratch", "pretrain_s"]) and times.loc["scratch", "total_s"] == 12
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "summary.json").write_text("{not json")
    with pytest.raises(MedsslError, match="bad/summary.json"):
        load_run_summaries(tmp_path)
    with pytest.raises(MedsslError, match="does not exist"):
        load_run_summaries(tmp_path / "missing")


# --------------------------------------------------------------------------- classifier AUROC


def _classifier_runs(root, methods=("scratch", "ssl")):
    """Classify run folders: 8 cases × 6 slices, 2 positive slices in 6 of the cases; 'ssl'
    ranks the positives above the negatives, 'scratch' scores at random."""
    rng = np.random.default_rng(0)
    for method in methods:
        for seed in range(3):
            rows = []
            for c in range(8):
                for s in range(6):
                    target = int(c < 6 and s < 2)
                    noise = rng.random()
                    score = 0.5 * target + 0.5 * noise if method == "ssl" else noise
                    rows.append(f"case_{c},{s},{score:.9g},{target}")
            run = root / method / f"labeled-all_seed-{seed}"
            run.mkdir(parents=True)
            (run / "predictions.csv").write_text("case,slice,score,target\n" + "\n".join(rows))
            summary = {"method": method, "mode": "classify", "labeled": 8, "seed": seed}
            (run / "summary.json").write_text(json.dumps(summary))


def test_auroc_table_and_paired_case_bootstrap(tmp_path):
    _classifier_runs(tmp_path)
    preds = load_classifier_predictions(tmp_path)
    assert len(preds) == 2 * 3 * 48 and set(preds["labeled"]) == {8.0}
    table = auroc_table(preds, n_boot=300).set_index("method")
    per_seed = {
        (m, s): auroc(g["score"].to_numpy(), g["target"].to_numpy())
        for (m, s), g in preds.groupby(["method", "seed"])
    }
    for method in ("scratch", "ssl"):
        assert table.loc[method, "auroc"] == pytest.approx(
            np.mean([per_seed[method, s] for s in range(3)])
        )
    diff = np.mean([per_seed["ssl", s] - per_seed["scratch", s] for s in range(3)])
    assert table.loc["ssl", "diff"] == pytest.approx(diff) and diff > 0.3
    assert table.loc["ssl", "ci_low"] > 0 and table.loc["ssl", "p_value"] < 0.05
    assert math.isnan(table.loc["scratch", "diff"])
    same = paired_auroc_difference(preds, "ssl", "ssl", 8.0, n_boot=50)
    assert same["diff"] == 0 and same["p_value"] == 1.0 and same["n_cases"] == 8
    one_class = preds.assign(target=0)  # AUROC undefined: NaN, not an endless redraw
    assert math.isnan(paired_auroc_difference(one_class, "ssl", "scratch", 8.0)["p_value"])
    text = auroc_markdown(auroc_table(preds, n_boot=50))
    assert "| ssl | 8 |" in text and "Δ vs scratch" in text


def test_cli_report_prints_the_auroc_table_and_names_bad_files(tmp_path, capsys):
    _classifier_runs(tmp_path)
    assert main(["report", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "AUROC" in out and "| scratch | 8 |" in out and "organ Dice" not in out
    bad = tmp_path / "ssl" / "labeled-all_seed-0" / "predictions.csv"
    bad.write_text("case,slice,score\ncase_0,0,0.5\n")
    with pytest.raises(MedsslError, match="labeled-all_seed-0.*target"):
        load_classifier_predictions(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["report", str(empty)]) != 0
    assert "no results.csv and no classifier run" in capsys.readouterr().err


def test_report_html_shows_the_comparison_as_a_table(tmp_path):
    from medssl_kit.viz.html_report import write_html_report

    table = comparison_table(_rows(), organs=[1, 2], lesions=[7])
    markdown = to_markdown(table)
    text = write_html_report(tmp_path / "report.html", "t", [("Comparison", [markdown])])
    text = text.read_text()
    assert "|---|" not in text and "| ssl |" not in text  # not one paragraph of raw pipes
    assert "<th>organ Dice</th>" in text and "<td>0.767 ± 0.002</td>" in text
    assert text.count("<tr>") == markdown.count("\n")  # the header and one row per method
