"""Course assignments (issue 8): the student copy, its grading, and that the two fit together.

The student copy is made once per module (a copy of the tracked files, ~2 MB) and graded in
subprocesses that run pytest inside it, so these tests measure the real thing a student runs.
"""

import io
import json
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from minipa import course
from minipa.cli import main as cli
from minipa.course import ASSIGNMENTS, NEEDS_EVERY_ASSIGNMENT, CourseError, find_regions, region_body, replace_region

ROOT = Path(__file__).resolve().parent.parent
STUB = "NotImplementedError: Assignment {}:"


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    return course.make_student(tmp_path_factory.mktemp("course") / "student")


def put_back(student: Path, a) -> str:
    """Copy assignment a's solution from this repository into the student copy; returns the stubbed text."""
    path = student / a.file
    stubbed = path.read_text(encoding="utf-8")
    solution = region_body((ROOT / a.file).read_text(encoding="utf-8"), a.number)
    path.write_text(replace_region(stubbed, a.number, solution), encoding="utf-8")
    return stubbed


def scores(summary) -> dict[int, tuple[int, int]]:
    return {row["number"]: (row["passed"], row["total"]) for row in summary["assignments"]}


# ─── The table and the markers ───────────────────────────────────────────────────────────────────


def test_every_assignment_has_one_region_and_every_region_an_assignment():
    course.check_regions(ROOT)
    assert [a.number for a in ASSIGNMENTS] == list(range(1, len(ASSIGNMENTS) + 1))
    for a in ASSIGNMENTS:
        assert region_body((ROOT / a.file).read_text(encoding="utf-8"), a.number), a
        assert all(0 < p < a.number for p in a.prerequisites) and a.tests and a.points > 0 and a.minutes > 0
    grading = [t for a in ASSIGNMENTS for t in a.tests]
    assert not set(grading) & set(NEEDS_EVERY_ASSIGNMENT)


def test_badly_marked_regions_are_clear_errors(tmp_path):
    cases = {
        "    # BEGIN ASSIGNMENT 1\n    x = 1\n": "has no END",
        "    # END ASSIGNMENT 1\n": "does not close",
        "    # BEGIN ASSIGNMENT 1\n# END ASSIGNMENT 1\n": "same indentation",
        "# BEGIN ASSIGNMENT 1\n# BEGIN ASSIGNMENT 2\n": "do not nest",
        "# BEGIN ASSIGNMENT 1\n# END ASSIGNMENT 1\n# BEGIN ASSIGNMENT 1\n# END ASSIGNMENT 1\n": "a second region",
    }
    for text, words in cases.items():
        with pytest.raises(CourseError, match=words):
            find_regions(text, "x.py")
    (tmp_path / "minipa").mkdir()
    (tmp_path / "minipa" / "extra.py").write_text("def f():\n    # BEGIN ASSIGNMENT 99\n    pass\n    # END ASSIGNMENT 99\n")
    with pytest.raises(CourseError, match="region 99 is not in the assignment table"):
        course.check_regions(tmp_path)
    (tmp_path / "not-empty").mkdir()
    (tmp_path / "not-empty" / "file").write_text("x")
    with pytest.raises(CourseError, match="not an empty folder"):
        course.make_student(tmp_path / "not-empty")
    with pytest.raises(CourseError, match=r"no assignment\(s\) \[42\]"):
        course.make_student(tmp_path / "new", only=[42])


# ─── The grader's face and bad input (no pytest run: fast) ──────────────────────────────────────


def files_in(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def minimal_copy(folder: Path) -> Path:
    """The least that grading accepts as a minipa copy: minipa/'s Python files and a tests/ folder."""
    for path in (ROOT / "minipa").rglob("*.py"):
        (folder / path.relative_to(ROOT)).parent.mkdir(parents=True, exist_ok=True)
        (folder / path.relative_to(ROOT)).write_bytes(path.read_bytes())
    (folder / "tests").mkdir()
    return folder


def one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and "Traceback" not in captured.err, captured
    return captured.err.removeprefix("minipa: error: ").rstrip("\n")


def test_grade_refuses_a_folder_that_is_not_a_minipa_copy_in_one_line(tmp_path, capsys):
    assert cli(["course", "grade", str(tmp_path)]) == 1
    assert one_error_line(capsys).startswith(f"{tmp_path} is not a minipa copy")
    assert cli(["course", "grade", str(tmp_path / "missing"), "--json"]) == 1
    assert one_error_line(capsys) == f"{tmp_path / 'missing'}: no such folder"
    assert not any(tmp_path.iterdir())


def test_make_student_into_a_non_empty_folder_is_one_line_and_writes_nothing(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert cli(["course", "make-student", str(tmp_path)]) == 1
    assert "not an empty folder" in one_error_line(capsys)
    assert files_in(tmp_path) == {"notes.txt": b"mine"}


def test_code_that_does_not_parse_is_named_by_file_line_and_assignment(tmp_path, capsys):
    copy = minimal_copy(tmp_path)
    a = ASSIGNMENTS[2]
    path = copy / a.file
    text = path.read_text(encoding="utf-8")
    begin, _, indent = find_regions(text)[a.number]
    lines = text.splitlines(keepends=True)
    path.write_text("".join(lines[: begin + 1] + [f"{indent}x_prev = (√ᾱ_prev * x0\n"] + lines[begin + 1 :]), encoding="utf-8")
    before = files_in(copy)
    assert cli(["course", "grade", str(copy)]) == 1
    message = one_error_line(capsys)
    assert message.startswith(f"{path}:{begin + 2}: assignment {a.number}'s region does not parse: "), message
    path.write_text(text + "def broken(:\n", encoding="utf-8")  # outside every region
    assert cli(["course", "grade", str(copy)]) == 1
    assert one_error_line(capsys).startswith(f"{path}:{len(lines) + 1}: this line (outside the assignment regions) does not parse")
    unmarked = text.replace(f"# BEGIN ASSIGNMENT {a.number}\n", "\n").replace(f"# END ASSIGNMENT {a.number}\n", "\n")
    path.write_text(unmarked, encoding="utf-8")
    assert cli(["course", "grade", str(copy)]) == 1
    assert one_error_line(capsys) == f"{path}: no region for assignment {a.number} (its # BEGIN/END ASSIGNMENT {a.number} lines are gone)"
    assert set(files_in(copy)) == set(before)  # nothing written (no report, no __pycache__)


def fake_results(monkeypatch, failures: dict[str, tuple[str, str]]) -> None:
    """Grade without running pytest: every test passes but those in `failures` ({node id: (outcome, message)})."""
    monkeypatch.setattr(course, "run_tests", lambda directory, nodeids: {n: failures.get(n, ("passed", "")) for n in nodeids})


def test_grading_the_reference_prints_the_folder_and_says_there_is_no_student_work(monkeypatch, capsys):
    fake_results(monkeypatch, {})
    monkeypatch.chdir(ROOT)
    assert cli(["course", "grade"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"grading {ROOT}"
    assert lines[1] == (f"no student work here: every assignment region in {ROOT} holds the reference solution — "
                        "make a copy with `minipa course make-student DIR`")
    assert cli(["course", "grade", "--json", "-a", "4"]) == 0
    assert json.loads(capsys.readouterr().out)["note"].startswith(f"no student work here: the region of assignment 4 in {ROOT}")


def test_the_table_shows_each_failing_assignments_first_failure_in_one_line(monkeypatch, capsys):
    first, third = ASSIGNMENTS[0], ASSIGNMENTS[2]
    long = "AssertionError: " + "the direction term is wrong " * 10 + "\nsecond line"
    fake_results(monkeypatch, {first.tests[0]: ("failed", STUB.format(first.number) + " return x_t = …"),
                               third.tests[1]: ("failed", long)})
    course.grade(ROOT, only=[first.number, third.number, 4])
    table = capsys.readouterr().out.splitlines()
    row = next(i for i, line in enumerate(table) if first.title in line)
    assert table[row + 1] == f"      ↳ {first.tests[0].split('::')[-1]}: not started (the region still raises its NotImplementedError)"
    row = next(i for i, line in enumerate(table) if third.title in line)
    failure = table[row + 1].removeprefix("      ↳ ")
    assert failure.startswith(f"{third.tests[1].split('::')[-1]}: AssertionError: the direction term is wrong")
    assert len(failure) == 110 and failure.endswith("…") and "second line" not in failure
    row = next(i for i, line in enumerate(table) if ASSIGNMENTS[3].title in line)
    assert "↳" not in table[row + 1]  # a passing assignment has no failure line


# ─── The student copy ────────────────────────────────────────────────────────────────────────────


def test_student_copy_imports_and_every_region_is_cut(student):
    modules = sorted({"minipa." + Path(a.file).stem for a in ASSIGNMENTS} | {"minipa.pipeline", "minipa.cli"})
    code = f"import minipa, {', '.join(modules)}; print(minipa.__file__)"
    done = subprocess.run([sys.executable, "-c", code], cwd=student, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()).is_relative_to(student)  # the copy's minipa, not this one
    assert course.blank_assignments(student) == [a.number for a in ASSIGNMENTS]
    assert course.blank_assignments(ROOT) == []
    for a in ASSIGNMENTS:
        solution = region_body((ROOT / a.file).read_text(encoding="utf-8"), a.number)
        cut = region_body((student / a.file).read_text(encoding="utf-8"), a.number)
        assert not set(line for line in solution if line.strip()) & set(cut), a.number
        assert f'"Assignment {a.number}: ' in "\n".join(cut)
    assert (student / "conftest.py").is_file() and not (student / ".git").exists()


def test_assignments_readme_reads_as_a_course(student):
    text = (student / "assignments" / "README.md").read_text(encoding="utf-8")
    positions = [text.index(f"## {a.number}. {a.title}") for a in ASSIGNMENTS]
    assert positions == sorted(positions)  # in course order
    for a in ASSIGNMENTS:
        start = text.index(f"## {a.number}. {a.title}")
        end = text.find("\n## ", start + 1)
        section = text[start : end if end != -1 else None]
        for words in (a.teaches, a.task, *a.hints, f"about {a.minutes} min", f"{a.points} points",
                      f"minipa course grade --assignment {a.number}", *a.tests):
            assert words in section, (a.number, words)
        assert ("prerequisites: none" in section) == (not a.prerequisites)
    assert "How to work" in text and "skipped" in text and "| # | assignment | where | prerequisites | time | points |" in text
    grader = text[text.index("## Running the grader") : text.index("## The course")]  # where, with what, which code
    for words in ("in this copy's top folder", "prints its path first", "pip install -e '.[test]'", "import *this* folder's `minipa/`"):
        assert words in grader, words


def test_full_tree_scores_full_marks(capsys):
    summary = course.grade(ROOT, json=True)
    printed = json.loads(capsys.readouterr().out)
    assert printed == summary and summary["points"] == summary["max_points"] == sum(a.points for a in ASSIGNMENTS)
    for a, row in zip(ASSIGNMENTS, summary["assignments"]):
        assert row["passed"] == row["total"] >= len(a.tests), row
        for pattern in a.tests:  # every listed test exists (a typo would be reported as "error", not passed)
            assert any(course._matches(t["id"], pattern) for t in row["tests"]), pattern


def test_whole_suite_in_the_student_copy(student):
    """Grading tests fail with their own stub, end-to-end tests are skipped, every other test passes."""
    results = course.run_tests(student, [])  # what `python -m pytest` runs there
    owner = {}
    for a in ASSIGNMENTS:
        for nodeid in results:
            if any(course._matches(nodeid, p) for p in a.tests):
                assert nodeid not in owner, f"{nodeid} grades both {owner[nodeid]} and {a.number}"
                owner[nodeid] = a.number
    for nodeid, (outcome, message) in results.items():
        if nodeid in owner:
            assert outcome == "failed" and message.startswith(STUB.format(owner[nodeid])), (nodeid, outcome, message)
        elif any(course._matches(nodeid, p) for p in NEEDS_EVERY_ASSIGNMENT):
            assert outcome == "skipped" and "needs every assignment; still blank: 1, 2, 3" in message, (nodeid, message)
        else:  # a test that runs a region but is in neither list fails here: add it to the table
            assert outcome == "passed" or (outcome == "skipped" and ("MINIPA_WEIGHTS" in message or "a student copy's notebook" in message)), \
                (nodeid, outcome, message)
    for pattern in [t for a in ASSIGNMENTS for t in a.tests] + list(NEEDS_EVERY_ASSIGNMENT):
        if (student / pattern.split("::")[0]).is_file():  # a renamed test would silently drop out of the lists
            assert any(course._matches(n, pattern) for n in results), f"no test {pattern}"


def test_student_notebooks_leave_the_cells_that_solve_an_assignment_to_the_student(student):
    solved = set()
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        original = json.loads(path.read_text(encoding="utf-8"))
        copy = json.loads((student / "notebooks" / path.name).read_text(encoding="utf-8"))
        nbformat.validate(nbformat.from_dict(copy))
        solving = course.solution_cells(original, path.name)
        handed_out = {course.cell_source(c) for c in copy["cells"] if c["cell_type"] == "code"}
        for i, assignments in solving.items():
            solved |= {a.number for a in assignments}
            assert course.cell_source(original["cells"][i]) not in handed_out, (path.name, i)
        blank = course.blanked_cells(copy)
        assert list(blank.values()) == [[a.number for a in cut] for cut in solving.values()], path.name
        for i, numbers in blank.items():
            assert copy["cells"][i]["outputs"] == [], (path.name, i)
            assert course.cell_source(copy["cells"][i - 1]).startswith(f"**This cell is your assignment {numbers[0]} ("), (path.name, i)
        if not solving:
            assert copy == original, path.name
    assert len(solved) >= 9, solved  # every assignment a notebook rebuilds by hand
    with pytest.raises(CourseError, match=r"x.ipynb: cell 0 solves \['nothing'\], which no assignment"):
        course.solution_cells({"cells": [{"cell_type": "code", "metadata": {"minipa": {"solves": ["nothing"]}}, "source": ""}]}, "x.ipynb")


def test_a_copy_tells_student_work_from_the_reference_even_when_graded_by_its_own_minipa(student, monkeypatch):
    originals = {a.file: (student / a.file).read_text(encoding="utf-8") for a in ASSIGNMENTS}
    monkeypatch.setattr(course, "ROOT", student)  # as `python -m minipa course grade` run inside the copy
    try:
        assert course.reference_note(student, list(ASSIGNMENTS)) is None  # blank regions
        for a in ASSIGNMENTS:
            put_back(student, a)
        assert course.reference_note(student, list(ASSIGNMENTS)) == (
            f"no student work here: every assignment region in {student} holds the reference solution — "
            "make a copy with `minipa course make-student DIR`")
        a = ASSIGNMENTS[3]
        path = student / a.file
        text = path.read_text(encoding="utf-8")
        mine = region_body(text, a.number)
        path.write_text(replace_region(text, a.number, [mine[0].replace(mine[0].lstrip(), "# my own words"), *mine]), encoding="utf-8")
        assert course.reference_note(student, list(ASSIGNMENTS)) is None
        assert course.reference_note(student, [ASSIGNMENTS[0]]).startswith("no student work here: the region of assignment 1 in")
    finally:
        for file, text in originals.items():
            (student / file).write_text(text, encoding="utf-8")


def test_cli_grades_the_student_copy_and_each_assignment_alone(student, capsys):
    assert cli(["course", "grade", str(student), "--json"]) == 1
    summary = json.loads(capsys.readouterr().out)
    assert summary["points"] == 0 and summary["max_points"] == sum(a.points for a in ASSIGNMENTS) and summary["note"] is None
    for row in summary["assignments"]:
        assert row["passed"] == 0 and all(t["message"].startswith(STUB.format(row["number"])) for t in row["tests"])
    a = ASSIGNMENTS[4]  # x̂0 and ε̂: among the quickest to grade
    stubbed = put_back(student, a)
    try:
        assert cli(["course", "grade", str(student), "--assignment", str(a.number)]) == 0
        table = capsys.readouterr().out
        assert table.startswith(f"grading {student}\n")
        assert a.title in table and f"{a.points}/{a.points}" in table and ASSIGNMENTS[0].title not in table
    finally:
        (student / a.file).write_text(stubbed, encoding="utf-8")


@pytest.mark.parametrize("number", [a.number for a in ASSIGNMENTS])
def test_putting_back_solution_k_makes_exactly_assignment_k_pass(student, number):
    a = ASSIGNMENTS[number - 1]
    stubbed = put_back(student, a)
    try:
        summary = course.grade(student, json=True, out=io.StringIO())
    finally:
        (student / a.file).write_text(stubbed, encoding="utf-8")
    assert course.blank_assignments(student) == [b.number for b in ASSIGNMENTS]
    for k, (passed, total) in scores(summary).items():
        assert passed == (total if k == number else 0), (k, passed, total)


# ─── Grading that diagnoses: the catalogue of wrong solutions (tests/course_mistakes.py) ─────────────


def test_weights_name_listed_tests_and_the_catalogue_has_three_mistakes_per_assignment():
    from course_mistakes import MISTAKES, reference_body

    for a in ASSIGNMENTS:
        assert set(a.weights) <= {t.split("::")[-1] for t in a.tests} and all(w > 0 for w in a.weights.values()), a.number
        mistakes = [m for m in MISTAKES if m.assignment == a.number]
        assert len(mistakes) >= 3, f"assignment {a.number} has {len(mistakes)} catalogued wrong solutions"
        assert all(m.words and m.code().split() != reference_body(a.number).split() for m in mistakes), a.number
    assert len({m.name for m in MISTAKES}) == len(MISTAKES)


def graded_catalogue(tmp_path, mistakes) -> list[dict]:
    """Grade `mistakes` and the reference solutions of their assignments, in one process (course_mistakes.py)."""
    out = tmp_path / "graded.json"
    command = [sys.executable, str(ROOT / "tests" / "course_mistakes.py"), str(out), *(m.name for m in mistakes)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert out.is_file(), done.stdout[-3000:] + done.stderr[-3000:]
    rows = json.loads(out.read_text(encoding="utf-8"))
    for m in mistakes:  # each wrong solution: under half of its assignment's points, its first message names it
        row = next(r for r in rows if r["name"] == m.name)
        assert row["number"] == m.assignment and row["points"] < row["max_points"] / 2, (m.name, row["points"], row["max_points"])
        assert m.words in row["first_message"], (m.name, m.words, row["first_message"])
    references = {r["number"]: r for r in rows if r["name"] == "reference"}  # the same harness gives the reference full marks
    assert sorted(references) == sorted({m.assignment for m in mistakes})
    assert all(r["points"] == r["max_points"] and r["passed"] == r["total"] for r in references.values()), references
    return rows


def test_a_wrong_solution_per_assignment_earns_under_half_and_its_message_names_the_mistake(tmp_path):
    from course_mistakes import MISTAKES

    graded_catalogue(tmp_path, list({m.assignment: m for m in reversed(MISTAKES)}.values()))  # each assignment's first


@pytest.mark.slow
def test_every_catalogued_wrong_solution_earns_under_half_and_its_message_names_the_mistake(tmp_path):
    from course_mistakes import MISTAKES

    graded_catalogue(tmp_path, MISTAKES)


# ─── The challenge copy (make-student --challenge) ──────────────────────────────────────────────────


@pytest.fixture(scope="module")
def both_modes(tmp_path_factory):
    """A guided and a challenge copy made one after the other (the tree may change while the module runs)."""
    folder = tmp_path_factory.mktemp("modes")
    return course.make_student(folder / "guided"), course.make_student(folder / "challenge", challenge=True)


def test_the_challenge_copy_is_the_guided_copy_with_other_stubs(both_modes):
    """Outside the regions (and the README) the two copies are the same bytes, and both stubs raise before any other
    line runs: so what the guided copy proves (putting back solution k makes exactly assignment k pass,
    test_putting_back_solution_k_makes_exactly_assignment_k_pass) holds for the challenge copy too."""
    student, challenge = both_modes
    made = lambda copy: {p.relative_to(copy) for p in copy.rglob("*") if p.is_file() and not any(  # noqa: E731
        part.startswith(".") or part == "__pycache__" for part in p.relative_to(copy).parts)}  # not what running tests leaves
    guided_files, challenge_files = made(student), made(challenge)
    assert guided_files == challenge_files
    stubbed = {a.file for a in ASSIGNMENTS}
    for name in guided_files - {Path("assignments/README.md")} - {Path(f) for f in stubbed}:
        assert (student / name).read_bytes() == (challenge / name).read_bytes(), name
    swapped = {}  # each file of the challenge copy with the guided copy's stubs put in its regions
    for a in ASSIGNMENTS:
        ours, theirs = (student / a.file).read_text(encoding="utf-8"), swapped.get(a.file) or (challenge / a.file).read_text(encoding="utf-8")
        assert region_body(theirs, a.number) == course.stub(a, find_regions(theirs)[a.number][2], challenge=True)
        swapped[a.file] = replace_region(theirs, a.number, region_body(ours, a.number))
        theirs = (challenge / a.file).read_text(encoding="utf-8")
        cut = " ".join("\n".join(region_body(theirs, a.number)).split())
        assert a.goal.split()[0] in cut and all(hint not in cut for hint in a.hints), a.number
        assert all(t.split("::")[-1].split("[")[0] in cut.replace('" "', "") for t in a.tests), a.number
    assert all((student / name).read_text(encoding="utf-8") == text for name, text in swapped.items())


def test_each_readme_says_which_mode_its_copy_is_in(both_modes):
    guided, hard = ((copy / "assignments" / "README.md").read_text(encoding="utf-8") for copy in both_modes)
    assert "This is a **guided** copy" in guided and "This is a **challenge** copy" in hard
    for a in ASSIGNMENTS:
        assert a.goal in hard and a.task not in hard and not any(hint in hard for hint in a.hints), a.number
        assert a.task in guided and all(hint in guided for hint in a.hints) and all(t in hard for t in a.tests), a.number


def test_cli_makes_a_challenge_copy_whose_every_assignment_fails_with_its_own_stub(tmp_path, capsys):
    assert cli(["course", "make-student", str(tmp_path / "copy"), "--challenge"]) == 0
    capsys.readouterr()
    summary = course.grade(tmp_path / "copy", json=True, out=io.StringIO())
    assert summary["points"] == 0
    for a, row in zip(ASSIGNMENTS, summary["assignments"]):
        stub = f"NotImplementedError: {a.challenge_message}"[:60]
        assert row["passed"] == 0 and all(t["message"].startswith(stub) for t in row["tests"]), (a.number, row["tests"][0])
