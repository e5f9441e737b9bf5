"""`ciss demo` trains every registered method once."""

from ciss.demo import SAME_AS, demo_methods
from ciss.methods import build_method, list_methods


def test_demo_trains_each_method_once():
    names = demo_methods()
    assert "nest" not in names and "nest_mib" in names
    assert set(names) | set(SAME_AS) == set(list_methods())
    for alias, name in SAME_AS.items():  # the skipped name is that method with its defaults
        a, b = build_method(alias), build_method(name)
        assert type(a.base) is type(b.base) and a.base == b.base
        assert {k: v for k, v in vars(a).items() if k != "base"} == {k: v for k, v in vars(b).items() if k != "base"}
