import pytest

from mmssl.registry import Registry


def test_register_build_and_names():
    reg = Registry("thing")

    @reg.register
    def small(width: int = 2):
        return ("small", width)

    @reg.register(name="big")
    def make_big():
        return "big"

    assert reg.names() == ["big", "small"]
    assert reg.build("small", width=5) == ("small", 5)
    assert reg.build("big") == "big"
    assert "small" in reg and "nope" not in reg


def test_unknown_name_and_option_are_named():
    reg = Registry("thing")

    @reg.register
    def small(width: int = 2):
        return width

    with pytest.raises(KeyError, match="unknown thing 'tall'.*small"):
        reg.build("tall")
    with pytest.raises(TypeError, match="'depth'"):
        reg.build("small", depth=3)


def test_register_twice_is_an_error():
    reg = Registry("thing")
    reg.register(lambda: 1, name="a")
    with pytest.raises(KeyError, match="twice"):
        reg.register(lambda: 2, name="a")
