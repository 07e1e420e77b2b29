import pytest

from course_lib.exercises import or_reference


def test_a_written_exercise_runs_and_errors_propagate():
    def my_square(x):
        if x < 0:
            raise ValueError("negative")
        return x * x

    square = or_reference(my_square, lambda x: -1)
    assert square(3) == 9 and not square.uses_reference()
    with pytest.raises(ValueError, match="negative"):
        square(-1)


def test_a_placeholder_falls_back_to_the_reference_once(capsys):
    calls = []

    def my_square(x):
        calls.append(x)
        raise NotImplementedError()

    def reference(x):
        return x * x

    square = or_reference(my_square, reference)
    assert [square(2), square(3)] == [4, 9]
    assert calls == [2] and square.uses_reference()
    out = capsys.readouterr().out
    assert out.count("not written yet") == 1 and "my_square" in out and "reference" in out


def test_not_a_function_is_refused():
    with pytest.raises(TypeError, match="exercise function itself"):
        or_reference(4, abs)
