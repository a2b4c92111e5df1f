"""copra.utils.settings: the one reader of YAML + --set for every config dataclass."""

from dataclasses import dataclass, field

import pytest

from copra.core.config import TrainConfig, load_config, make_config
from copra.utils.errors import UserError
from copra.utils.settings import build_dataclass, check_known, dataclass_defaults, load_dataclass, read_values


@dataclass
class _Example:
    name: str  # required: no default to report
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    ratio: float = 0.5
    pair: tuple = (1, 2)


def test_values_from_yaml_then_sets(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("ratio: 0.25\nseeds: [3]\nname: a\n")
    assert read_values(path, ["ratio=0.5", "name=b"]) == {"ratio": 0.5, "seeds": [3], "name": "b"}
    assert read_values(None, None) == {}
    loaded = load_dataclass(_Example, path, ["seeds=4,5", "ratio=5e-1"])  # YAML reads 5e-1 as a string
    assert loaded == _Example(name="a", seeds=[4, 5], ratio=0.5)
    assert load_config(None, ["steps=7", "method=lora"]) == make_config({"steps": 7, "method": "lora"})


def test_one_unknown_key_check_for_every_config():
    with pytest.raises(UserError, match="unknown config key 'ratios'; known keys: name, pair, ratio, seeds"):
        check_known({"ratio": 1.0, "ratios": 2.0}, _Example)
    with pytest.raises(UserError, match="unknown config key 'ratios'"):
        build_dataclass(_Example, {"name": "a", "ratios": 2.0})
    with pytest.raises(UserError, match="unknown config key 'stepz'; known keys: .*steps"):
        make_config({"stepz": 3})
    with pytest.raises(UserError, match="seeds\\[1\\] must be an integer"):
        build_dataclass(_Example, {"name": "a", "seeds": [1, "x"]})


def test_dataclass_defaults_as_json_stores_them():
    assert dataclass_defaults(_Example) == {"seeds": [0, 1], "ratio": 0.5, "pair": [1, 2]}
    assert dataclass_defaults(TrainConfig) == TrainConfig.defaults() == TrainConfig().to_dict()


def test_field_help_reads_each_fields_comment_inherited_ones_too():
    from copra.utils.settings import field_help, keys_help

    @dataclass
    class Base:
        shots: int = 8  #: examples per class

    @dataclass
    class Child(Base):
        name: str = "x"  #: a name
        values: list = field(  #: spread over
            default_factory=list  #: two lines
        )
        bare: int = 0
        #: said above
        above: int = 1  # a plain comment is not help

    assert field_help(Child) == {
        "shots": "examples per class",
        "name": "a name",
        "values": "spread over two lines",
        "above": "said above",
    }
    assert keys_help(Child).splitlines() == [
        "  shots = 8    examples per class",
        "  name = 'x'   a name",
        "  values = []  spread over two lines",
        "  bare = 0",
        "  above = 1    said above",
    ]
