"""Config keys users can find: descriptions from config.py's field comments, `fedtune config --explain`."""

import dataclasses
import inspect
import tomllib

from fedtune.cli import main
from fedtune.core import config as config_module
from fedtune.core.config import ExperimentConfig, config_to_dict
from fedtune.core.explain import DOCS_PAGE, config_fields, source_docs, toml_value
from tests.conftest import ROOT


def config_dataclasses() -> list[type]:
    return [obj for _, obj in inspect.getmembers(config_module, inspect.isclass)
            if dataclasses.is_dataclass(obj) and obj.__module__ == config_module.__name__]


def test_every_field_of_every_config_dataclass_has_a_description():
    docs = source_docs(inspect.getsource(config_module))
    assert ExperimentConfig in config_dataclasses()
    missing = [f"{cls.__name__}.{f.name}" for cls in config_dataclasses() for f in dataclasses.fields(cls)
               if not docs.get(cls.__name__, {}).get(f.name, ("", ""))[1].strip()]
    assert not missing, (f"config fields without a description: {missing}; add a `# ...` comment on the field's"
                         " line or on the lines directly above it in fedtune/core/config.py")
    keys = {f.key for f in config_fields()}
    assert {"federation.num_rounds", "lora.ranks", "defense.norm_cap", "simulation.ray_address"} <= keys


def test_descriptions_join_the_comment_block_above_and_the_trailing_comment():
    source = '''
@dataclass
class C:
    a: int = 1  # trailing only
    # above, line one
    # line two
    b: list[int] = field(
        default_factory=list)  # and trailing
    # a comment cut off by a blank line

    c: str = ""
    d: float = 0.0  # "quoted # hash" stays
'''
    docs = source_docs(source)["C"]
    assert docs["a"] == ("int", "trailing only")
    assert docs["b"] == ("list[int]", "above, line one line two and trailing")
    assert docs["c"] == ("str", "")
    assert docs["d"] == ("float", '"quoted # hash" stays')


def test_every_default_is_printed_as_the_toml_that_sets_it():
    values = config_to_dict(ExperimentConfig())
    for f in config_fields():
        if f.section:
            continue
        node = values
        for part in f.key.split("."):
            node = node[part]
        assert tomllib.loads(f"v = {f.default}")["v"] == node, f.key
    assert toml_value({"jetson-tx2": [0.5, 1.0], "a b": "x"}) == '{ jetson-tx2 = [0.5, 1.0], "a b" = "x" }'


def test_the_cli_prints_a_known_key_with_its_type_and_default(capsys):
    assert main(["config", "--explain"]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.split()[:1] == ["federation.num_rounds"])
    assert line.split() == ["federation.num_rounds", "int", "=", "10"]
    assert "federated rounds to run" in out and "[defense]" in out


def test_docs_config_md_is_what_the_cli_generates_now(capsys):
    assert main(["config", "--explain", "--format", "markdown"]) == 0
    generated = capsys.readouterr().out
    assert "| `lora.ranks` | `list[int]` | `[4, 8, 16]` |" in generated
    assert DOCS_PAGE == ROOT / "docs" / "config.md"
    current = DOCS_PAGE.read_text(encoding="utf-8") if DOCS_PAGE.is_file() else ""
    assert current == generated, ("docs/config.md is out of date with fedtune/core/config.py; regenerate it with"
                                  " `.venv/bin/fedtune config --explain --format markdown > docs/config.md`"
                                  " (or `.venv/bin/python -m fedtune.core.explain --write`, which also updates"
                                  " pyproject.toml's run-config keys)")
