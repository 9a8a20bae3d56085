import math

import numpy as np
import pandas as pd
import pytest
from scipy.stats import wilcoxon

from medssl_kit.errors import MedsslError
from medssl_kit.evaluate.results import (
    RESULT_COLUMNS,
    aggregate,
    load_results,
    paired_wilcoxon,
    write_results,
)


def _row(method="scratch", seed=0, case="case_000", class_id=1, dice=0.5, **kw):
    row = {
        "method": method,
        "backbone": "unet",
        "dims": 2,
        "labeled": 1,
        "seed": seed,
        "case": case,
        "class_id": class_id,
        "class": {1: "liver", 2: "spleen"}.get(class_id, f"c{class_id}"),
        "dice": dice,
        "hd95": 3.5,
        "iou": dice / (2 - dice),
    }
    row.update(kw)
    return row


def test_write_load_round_trip_keeps_values_and_dtypes(tmp_path):
    rows = [
        _row(case="007", dice=0.123456789012345, mode="finetune"),
        _row(case="008", class_id=2, dice=0.0, hd95=math.nan, iou=0.0, labeled=0.25),
        _row(case="008", class_id=7, dice=math.nan, hd95=math.nan, iou=math.nan, run_id="r1"),
    ]
    path = write_results(rows, tmp_path / "runs" / "r1" / "results.csv")
    assert [p.name for p in path.parent.iterdir()] == ["results.csv"]  # no temp file left
    df = load_results(path)
    assert list(df.columns) == RESULT_COLUMNS + ["mode", "run_id"]
    assert df["case"].tolist() == ["007", "008", "008"]  # ids stay strings
    assert df["dice"].iloc[0] == 0.123456789012345  # full precision
    assert df["labeled"].tolist() == [1.0, 0.25, 1.0]
    assert math.isnan(df["hd95"].iloc[1]) and math.isnan(df["dice"].iloc[2])
    assert df["mode"].tolist() == ["finetune", "", ""]
    assert df["run_id"].tolist() == ["", "", "r1"]
    for col in ("dims", "seed", "class_id"):
        assert df[col].dtype == np.int64
    for col in ("labeled", "dice", "hd95", "iou"):
        assert df[col].dtype == np.float64
    assert pd.api.types.is_string_dtype(df["method"]) and pd.api.types.is_string_dtype(df["case"])


def test_case_counts_are_written_as_integers_and_round_trip(tmp_path):
    rows = [_row(labeled=1.0), _row(labeled=8, case="c8"), _row(labeled=0.25, case="c9")]
    path = write_results(rows, tmp_path / "results.csv")
    written = pd.read_csv(path, dtype=str)
    assert written["labeled"].tolist() == ["1", "8", "0.25"]
    assert path.read_text().splitlines()[1].startswith("scratch,unet,2,1,0,case_000,1,")
    df = load_results(path)
    assert df["labeled"].tolist() == [1.0, 8.0, 0.25] and df["labeled"].dtype == np.float64
    again = write_results(df.to_dict("records"), tmp_path / "again.csv")
    assert again.read_text() == path.read_text()


def test_write_validates_before_touching_the_file(tmp_path):
    path = write_results([_row()], tmp_path / "results.csv")
    original = path.read_bytes()
    bad = _row()
    del bad["hd95"]
    with pytest.raises(ValueError, match="hd95"):
        write_results([_row(), bad], path)
    with pytest.raises(ValueError, match="dice"):
        write_results([_row(dice=1.5)], path)
    with pytest.raises(ValueError, match="dims"):
        write_results([_row(dims=4)], path)
    assert path.read_bytes() == original
    assert [p.name for p in tmp_path.iterdir()] == ["results.csv"]


def test_load_discovers_results_in_folders(tmp_path):
    runs = tmp_path / "runs"
    write_results([_row(case="a"), _row(case="b")], runs / "one" / "results.csv")
    write_results([_row(case="c")], runs / "two" / "nested" / "results.csv")
    (runs / "one" / "other.csv").write_text("not,a,results,file\n")
    assert sorted(load_results(runs)["case"]) == ["a", "b", "c"]
    # a file reached twice (directly and through its folder) is read once
    both = load_results([runs / "one" / "results.csv", str(runs)])
    assert sorted(both["case"]) == ["a", "b", "c"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MedsslError, match="no results.csv"):
        load_results(empty)
    with pytest.raises(MedsslError, match="does not exist"):
        load_results(tmp_path / "missing")


HEADER = ",".join(RESULT_COLUMNS)
GOOD = "scratch,unet,2,1,0,case_000,1,liver,0.5,3.5,0.33"


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("", "empty"),
        ("method,backbone,dims\nscratch,unet,2\n", "missing column"),
        (f"{HEADER}\n{GOOD.replace('0.5', 'abc')}\n", "'abc' is not a number"),
        (f"{HEADER}\n{GOOD},extra\n", "12 fields"),
        (f"{HEADER}\n{GOOD.replace(',0.5,', ',2.0,')}\n", "dice"),
        (f"{HEADER}\n{GOOD.replace(',0,case', ',0.5,case')}\n", "seed"),
        (f"{HEADER}\n{GOOD.replace('case_000', '')}\n", "case"),
    ],
)
def test_malformed_file_error_names_the_file(tmp_path, content, fragment):
    path = tmp_path / "run_x" / "results.csv"
    path.parent.mkdir()
    path.write_text(content)
    with pytest.raises(MedsslError) as exc:
        load_results(tmp_path)
    assert str(path) in str(exc.value) and fragment in str(exc.value)


def _frame(rows):
    return pd.DataFrame(rows)


def test_aggregate_mean_sd_over_seeds_of_case_means():
    rows = [
        # seed 0: case means 0.7 and 0.9 (NaN skipped) -> 0.8
        _row("ssl", 0, "c1", 1, 0.8),
        _row("ssl", 0, "c1", 2, 0.6),
        _row("ssl", 0, "c2", 1, 0.9),
        _row("ssl", 0, "c2", 2, math.nan, iou=math.nan),
        # seed 1: case means 0.6 and 0.5 -> 0.55
        _row("ssl", 1, "c1", 1, 0.5),
        _row("ssl", 1, "c1", 2, 0.7),
        _row("ssl", 1, "c2", 1, 0.4),
        _row("ssl", 1, "c2", 2, 0.6),
        _row("scratch", 0, "c1", 1, 0.3),
        _row("scratch", 0, "c2", 1, 0.5),
    ]
    df = _frame(rows).sample(frac=1.0, random_state=0)
    out = aggregate(df).set_index("method")
    assert out.loc["ssl", "dice_mean"] == pytest.approx(0.675)
    assert out.loc["ssl", "dice_sd"] == pytest.approx(0.25 / math.sqrt(2))
    assert (out.loc["ssl", "n_seeds"], out.loc["ssl", "n_cases"]) == (2, 2)
    assert out.loc["scratch", "dice_mean"] == pytest.approx(0.4)
    assert math.isnan(out.loc["scratch", "dice_sd"])  # one seed
    assert out.loc["ssl", "hd95_mean"] == pytest.approx(3.5)
    liver = aggregate(df, classes=["liver"]).set_index("method")
    assert liver.loc["ssl", "dice_mean"] == pytest.approx((0.85 + 0.45) / 2)
    assert liver.loc["ssl", "dice_sd"] == pytest.approx(0.4 / math.sqrt(2))
    per_class = aggregate(df, by=("method", "class_id"), metrics=["dice"])
    assert len(per_class) == 3 and list(per_class.columns[-4:]) == [
        "dice_mean",
        "dice_sd",
        "n_seeds",
        "n_cases",
    ]


def test_aggregate_refuses_mixed_rows():
    df = _frame([_row(), _row(backbone="resunet")])
    with pytest.raises(ValueError, match="backbone"):
        aggregate(df)
    assert len(aggregate(df, by=("method", "backbone"))) == 2


def _paired_frame(rng, labeled=1):
    rows = []
    for seed in (0, 1):
        for i in range(8):
            for class_id in (1, 2):
                base = rng.uniform(0.3, 0.8)
                rows.append(_row("scratch", seed, f"c{i}", class_id, base, labeled=labeled))
                rows.append(
                    _row(
                        "ssl",
                        seed,
                        f"c{i}",
                        class_id,
                        base + rng.normal(0.05, 0.05),
                        labeled=labeled,
                    )
                )
    return _frame(rows)


def test_paired_wilcoxon_matches_scipy_and_pairs_by_case_and_seed():
    rng = np.random.default_rng(0)
    df = _paired_frame(rng)
    df.loc[df["dice"] > 1, "dice"] = 1.0
    keys = [(s, f"c{i}") for s in (0, 1) for i in range(8)]

    def case_means(method):
        part = df[df["method"] == method]
        return np.array([part[(part.seed == s) & (part.case == c)]["dice"].mean() for s, c in keys])

    x, y = case_means("ssl"), case_means("scratch")
    expected = wilcoxon(x, y)
    shuffled = pd.concat([df, _paired_frame(rng, labeled=2)]).sample(frac=1.0, random_state=3)
    result = paired_wilcoxon(shuffled, "ssl", labeled=1)
    assert result["reason"] is None and result["n_pairs"] == 16
    assert result["statistic"] == pytest.approx(expected.statistic)
    assert result["p_value"] == pytest.approx(expected.pvalue)
    assert result["median_difference"] == pytest.approx(np.median(x - y))
    mispaired = wilcoxon(x, np.roll(y, 1))
    assert mispaired.pvalue != pytest.approx(expected.pvalue)

    per_class = paired_wilcoxon(df, "ssl", baseline="scratch", per_class=True)
    px = df[df.method == "ssl"].sort_values(["case", "seed", "class_id"])["dice"].to_numpy()
    py = df[df.method == "scratch"].sort_values(["case", "seed", "class_id"])["dice"].to_numpy()
    assert per_class["n_pairs"] == 32
    assert per_class["p_value"] == pytest.approx(wilcoxon(px, py).pvalue)


def test_paired_wilcoxon_over_seeds_tests_per_seed_means_of_the_paired_cases():
    # Eight seeds of 6 cases: ssl is ahead by 0.01 on every case but one, which moves its
    # seed's mean up or down by a seed-specific amount - the pairs agree, the seeds do not.
    rng = np.random.default_rng(1)
    shift = rng.normal(0.0, 0.05, size=8)
    rows = []
    for seed in range(8):
        for i in range(6):
            base = rng.uniform(0.4, 0.8)
            rows.append(_row("scratch", seed, f"c{i}", 1, base))
            if seed == 3 and i == 5:
                continue  # unpaired: must not enter seed 3's mean
            rows.append(_row("ssl", seed, f"c{i}", 1, base + (6 * shift[seed] if i == 0 else 0.01)))
    df = _frame(rows)
    by_case = paired_wilcoxon(df, "ssl")
    by_seed = paired_wilcoxon(df, "ssl", unit="seed")
    x, y = [], []
    for seed in range(8):
        cases = range(5) if seed == 3 else range(6)
        part = df[(df.seed == seed) & df.case.isin([f"c{i}" for i in cases])]
        x.append(part[part.method == "ssl"]["dice"].mean())
        y.append(part[part.method == "scratch"]["dice"].mean())
    expected = wilcoxon(x, y)
    assert by_seed["n_pairs"] == 8 and by_case["n_pairs"] == 47
    assert by_seed["p_value"] == pytest.approx(expected.pvalue)
    assert by_seed["statistic"] == pytest.approx(expected.statistic)
    assert by_case["p_value"] < 1e-4 < 0.1 < by_seed["p_value"]
    few = paired_wilcoxon(df[df.seed < 3], "ssl", unit="seed")
    assert few["n_pairs"] == 3 and "fewer than min_pairs" in few["reason"]
    with pytest.raises(ValueError, match="unit"):
        paired_wilcoxon(df, "ssl", unit="run")


def test_paired_wilcoxon_too_few_pairs_gives_nan_with_reason():
    rows = [_row("scratch", 0, f"c{i}", 1, 0.5) for i in range(3)]
    rows += [_row("ssl", 0, f"c{i}", 1, 0.6 + i / 100) for i in range(4)]  # c3 has no partner
    result = paired_wilcoxon(_frame(rows), "ssl")
    assert result["n_pairs"] == 3 and math.isnan(result["p_value"])
    assert "fewer than min_pairs" in result["reason"]
    assert result["median_difference"] == pytest.approx(0.11)
    missing = paired_wilcoxon(_frame(rows), "nonexistent")
    assert missing["n_pairs"] == 0 and math.isnan(missing["median_difference"])
    same = paired_wilcoxon(_frame(rows), "scratch", baseline="scratch", min_pairs=1)
    assert "zero" in same["reason"] and math.isnan(same["statistic"])
