"""Methods declare themselves: every parameter's type, default and range, read by the rest of the product."""

from __future__ import annotations

import pytest

from hf_merge.errors import UsageError
from hf_merge.merging.methods.base import Parameter
from hf_merge.merging.methods.registry import METHODS


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_declares_itself_and_its_defaults_pass_their_own_checks(name):
    cls = METHODS[name]
    assert cls.name == name
    # the arXiv abstract page; OpenReview's for a paper not on arXiv (DOP, NeurIPS 2025)
    assert cls.display_name and cls.summary and cls.paper.startswith(("https://arxiv.org/abs/", "https://openreview.net/forum?id="))
    assert cls.defaults == {p.name: p.default for p in cls.parameters}
    assert cls.check_parameters({}) == cls.defaults
    for parameter in cls.parameters:
        assert parameter.help
        assert parameter.check(parameter.default, name) == parameter.default
        assert all(flag.startswith("--") for flag in parameter.flags)


def test_numbers_are_checked_against_type_and_range():
    alpha = Parameter("alpha", 0.5, "share", minimum=0.0, maximum=1.0)
    assert alpha.check(1, "opcm") == 1.0 and isinstance(alpha.check(1, "opcm"), float)
    with pytest.raises(UsageError, match=r"^method 'opcm': parameter 'alpha' must be in \[0, 1\], got 1.5$"):
        alpha.check(1.5, "opcm")
    with pytest.raises(UsageError, match=r"^method 'opcm': parameter 'alpha' must be a number in \[0, 1\], got 'high'$"):
        alpha.check("high", "opcm")
    with pytest.raises(UsageError, match="must be a number"):
        alpha.check(True, "opcm")  # a bool is no number here, although Python says it is an int
    with pytest.raises(UsageError, match="must be a number"):
        alpha.check(float("nan"), "opcm")
    keep = Parameter("threshold", 0.2, "kept", minimum=0.0, maximum=100.0, exclusive_minimum=True)
    with pytest.raises(UsageError, match=r"must be in \(0, 100\], got 0$"):
        keep.check(0, "ties")
    steps = Parameter("steps", 300, "iterations", type=int, minimum=1)
    with pytest.raises(UsageError, match=r"must be an integer in \[1, inf\), got 2.5"):
        steps.check(2.5, "wudi")


def test_bools_strings_and_choices():
    flag = Parameter("zero_diagonal", True, "zero it", type=bool)
    with pytest.raises(UsageError, match="must be true or false, got 'yes'"):
        flag.check("yes", "opcm")
    kind = Parameter("svd_dtype", "float32", "precision", type=str, choices=("float32", "float64"))
    assert kind.check("float64", "opcm") == "float64"
    with pytest.raises(UsageError, match="must be one of float32, float64, got 'float16'"):
        kind.check("float16", "opcm")


def test_unknown_parameters_name_the_closest_and_a_long_value_is_cut_short():
    opcm = METHODS["opcm"]
    with pytest.raises(UsageError, match=r"has no parameter 'alhpa' \(did you mean 'alpha'\?\); its parameters: alpha, "):
        opcm.check_parameters({"alhpa": 0.5})
    with pytest.raises(UsageError) as error:
        opcm.check_parameters({"alpha": "x" * 10_000})
    assert len(str(error.value)) < 200 and "\n" not in str(error.value)
