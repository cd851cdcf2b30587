"""docs/reliability.md's fault table: rendered between its markers, re-rendered in place, dated rows kept."""

from __future__ import annotations

from pathlib import Path

from tests.integration import fault_table
from tests.integration.fault_table import Row


def _row(fault: str, date: str, restarts: int = 1) -> Row:
    return Row(
        fault=fault,
        injected="how",
        outcome="Succeeded (AllStagesSucceeded)",
        recovery_seconds=41.6,
        steps_lost=2,
        data_lost="none",
        restarts=restarts,
        disruptions=0,
        date=date,
        notes="a | b",
    )


def test_rows_render_between_the_markers_and_a_rerun_replaces_only_what_it_measured(tmp_path: Path) -> None:
    doc = tmp_path / "reliability.md"
    doc.write_text(f"# Reliability\n\nbefore\n\n{fault_table.BEGIN}\nold text\n{fault_table.END}\n\nafter\n")
    fault_table.update_doc(
        doc, [_row("rank SIGKILL", "2026-11-30"), _row("pod evicted", "2026-11-30")], {"wall": "300 s"}
    )
    first = doc.read_text()
    assert first.startswith("# Reliability\n\nbefore\n\n") and first.endswith("\n\nafter\n")
    assert "old text" not in first and first.count(fault_table.BEGIN) == first.count(fault_table.END) == 1
    assert (
        "| **rank SIGKILL**: how | Succeeded (AllStagesSucceeded); a \\| b | 42 | 2 | none | 1 | 0 | 2026-11-30 |"
        in first
    )
    assert "Last run: wall 300 s." in first

    # a later run of one fault: its row is replaced, the other (dated) row is kept, an undated one dropped
    doc.write_text(
        first.replace(
            fault_table.END, "| **by hand** | x | – | – | – | – | – | no date |\n" + fault_table.END
        )
    )
    fault_table.update_doc(doc, [_row("rank SIGKILL", "2026-12-01", restarts=2)], {"wall": "100 s"})
    second = doc.read_text()
    assert "2026-11-30 |" in second.split("**pod evicted**")[1].splitlines()[0]
    assert (
        "| 2 | 0 | 2026-12-01 |" in second and "by hand" not in second and second.count("rank SIGKILL") == 1
    )
    assert second.index("rank SIGKILL") < second.index("pod evicted")  # measured rows first
    # rendering is a pure function of the rows: the same rows again change nothing
    fault_table.update_doc(doc, [_row("rank SIGKILL", "2026-12-01", restarts=2)], {"wall": "100 s"})
    assert doc.read_text() == second


def test_the_json_round_trips(tmp_path: Path) -> None:
    rows = [
        _row("rank SIGKILL", "2026-12-01"),
        Row(
            "job deleted",
            "kubectl delete aj",
            "deleted: nothing left",
            None,
            None,
            "–",
            None,
            None,
            "2026-12-01",
        ),
    ]
    fault_table.write_rows(tmp_path / "faults.json", rows, {"jobs at once": 4})
    assert fault_table.read_rows(tmp_path / "faults.json") == (rows, {"jobs at once": 4})
