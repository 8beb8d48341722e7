"""Survival, regression and ordinal label tables: every bad value is one error naming its row and column."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from tests.conftest import write_text_file

from slidemil.errors import InputError
from slidemil.tasks import TaskConfig, create_task


def survival(**kw):
    return create_task(TaskConfig(task="survival", **kw))


def table(tmp_path, rows, header="slide_id,case_id,time,event"):
    return write_text_file(tmp_path, header + "\n" + "\n".join(rows) + "\n")


GOOD = ["s1,p1,10,1", "s2,p2,20,0", "s3,p3,5.5,true", "s4,p3,5.5,TRUE", "s5,p4,30,False"]


def test_a_good_survival_table_parses(tmp_path):
    cohort = survival().read(table(tmp_path, GOOD))
    assert cohort.table["time"].tolist() == [10, 20, 5.5, 5.5, 30]
    assert cohort.table["event"].tolist() == [1, 0, 1, 1, 0]
    assert cohort.target_cols == ("time", "event") and cohort.classes == []


@pytest.mark.parametrize("row, words", [
    ("s9,p9,-3,1", ["negative", "row(s) 7", "'time'"]),
    ("s9,p9,0,1", ["event at time 0", "row(s) 7"]),
    ("s9,p9,ten,1", ["must hold numbers", "row(s) 7", "'ten'"]),
    ("s9,p9,12,2", ["'event' must be 1/true", "row(s) 7", "'2'"]),
    ("s9,p1,12,1", ["p1", "different values of column 'time'", "row(s) 2, 7"]),
])
def test_bad_survival_values_name_row_and_column(tmp_path, row, words):
    with pytest.raises(InputError) as err:
        survival().read(table(tmp_path, GOOD + [row]))
    for w in words:
        assert w in str(err.value), str(err.value)


def test_rows_without_an_outcome_are_left_out_and_recorded_as_classification_does(tmp_path, caplog):
    """A survival row without a time or event, or a regression row without a target, stopped the run while an
    unlabelled classification row was left out: the same table (a clinical export with some outcomes not
    available) now trains every task, each left-out row warned and named with its reason in excluded.csv."""
    # and as clinical exports mark a missing number: GDC's '--, cBioPortal's [Not Available]
    rows = GOOD + ["s9,p9,,1", "s10,p10,12,", "s11,p11,'--,1", "s12,p12,[Not Available],0", "s13,p13,4,NA"]
    with caplog.at_level("WARNING"):
        cohort = survival().read(table(tmp_path, rows))
    assert len(cohort.table) == len(GOOD)
    assert set(cohort.excluded) == {"s9", "s10", "s11", "s12", "s13"} and "row 7" in cohort.excluded["s9"]
    assert "'time' is empty or marked missing in row(s) 7, 9, 10" in caplog.text
    assert "'event' is empty or marked missing in row(s) 8, 11" in caplog.text
    task = create_task(TaskConfig(task="regression", target_col="ki67"))
    cohort = task.read(table(tmp_path, ["a,p1,3", "b,p2,", "c,p3,5"], header="slide_id,case_id,ki67"))
    assert cohort.table["target"].tolist() == [3.0, 5.0] and list(cohort.excluded) == ["b"]
    with pytest.raises(InputError, match="no row has a value in column 'ki67'"):
        task.read(table(tmp_path, ["a,p1,", "b,p2,"], header="slide_id,case_id,ki67"))


def test_event_columns_as_tcga_and_cbioportal_write_them(tmp_path):
    """TCGA's vital_status (Dead/Alive) and cBioPortal's OS_STATUS (1:DECEASED / 0:LIVING) were refused as
    event indicators: a user had to recode the clinical export first."""
    rows = ["a,p1,10,1:DECEASED", "b,p2,20,0:LIVING", "c,p3,5,Dead", "d,p4,7,alive", "e,p5,9,1:PROGRESSION"]
    cohort = survival().read(table(tmp_path, rows))
    assert cohort.table["event"].tolist() == [1, 0, 1, 0, 1]
    with pytest.raises(InputError, match=r"row\(s\) 2 hold '2:other'"):
        survival().read(table(tmp_path, ["a,p1,10,2:other", "b,p2,20,1"]))


def test_renamed_columns_and_missing_ones(tmp_path):
    path = table(tmp_path, ["a,p1,3,1", "b,p2,4,0"], header="slide_id,case_id,os_months,dead")
    cohort = survival(time_col="os_months", event_col="dead").read(path)
    assert cohort.table["time"].tolist() == [3, 4]
    with pytest.raises(InputError, match="column 'time' is missing.*--time-col"):
        survival().read(path)


def test_no_event_at_all_is_refused(tmp_path):
    with pytest.raises(InputError, match="no observed event"):
        survival().read(table(tmp_path, ["a,p1,3,0", "b,p2,4,0"]))


def test_a_fold_without_events_is_refused(tmp_path):
    task = survival()
    cohort = task.read(table(tmp_path, ["a,p1,3,1", "b,p2,4,0", "c,p3,5,0", "d,p4,6,1"]))
    splits = pd.DataFrame({"slide_id": ["a", "b", "c", "d"], "case_id": ["p1", "p2", "p3", "p4"], "fold": 0,
                           "role": ["train", "train", "test", "test"]})
    task.check_splits(splits, cohort.table)
    splits["role"] = ["test", "train", "train", "test"]
    with pytest.raises(InputError, match="fold 0: no patient with an event in its train part"):
        task.check_splits(splits, cohort.table)
    with pytest.raises(InputError, match="needs at least 3"):
        task.strata(cohort.table, 3)


def test_survival_strata_balance_events_and_times():
    rng = np.random.default_rng(0)
    t = pd.DataFrame({"case_id": [f"p{i}" for i in range(60)], "time": rng.uniform(1, 100, 60),
                      "event": (rng.uniform(size=60) < 0.5).astype(int)})
    strata = survival().strata(t, 5)
    # each stratum is one event status over one time range, and holds enough patients for 5 folds
    for s in np.unique(strata):
        part = t[strata == s]
        assert part["event"].nunique() == 1 and len(part) >= 5


def test_regression_targets(tmp_path):
    task = create_task(TaskConfig(task="regression", target_col="ki67"))
    path = table(tmp_path, ["a,p1,3.5", "b,p2,4", "c,p2,4"], header="slide_id,case_id,ki67")
    assert task.read(path).table["target"].tolist() == [3.5, 4.0, 4.0]
    for rows, words in ((["a,p1,3", "b,p2,3"], "constant"), (["a,p1,3", "b,p2,x"], r"row\(s\) 3"),
                        (["a,p1,3", "b,p1,4"], "different values of column 'ki67'")):
        with pytest.raises(InputError, match=words):
            task.read(table(tmp_path, rows, header="slide_id,case_id,ki67"))


def test_ordinal_keeps_the_given_order(tmp_path):
    task = create_task(TaskConfig(task="ordinal", classes=["low", "mid", "high"]))
    path = table(tmp_path, [f"s{i},p{i},{g}" for i, g in enumerate(["high", "low", "mid"] * 2)],
                 header="slide_id,case_id,label")
    cohort = task.read(path)
    assert cohort.classes == ["low", "mid", "high"] and task.n_outputs(cohort) == 2
    assert cohort.table["y"].tolist() == [2, 0, 1, 2, 0, 1]
