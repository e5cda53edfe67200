"""``gkd methods`` and config validation against the real ``methods.registry`` (skipped while it
cannot be imported)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from gkd_cli.app import app
from gkd_cli.errors import ConfigError
from tests.unit.test_config_load import base_config, load

pytestmark = pytest.mark.unit

registry = pytest.importorskip("methods.registry")
runner = CliRunner()


def test_methods_list_shows_every_registered_method():
    result = runner.invoke(app, ["methods", "list"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    for name, spec in registry.REGISTRY.items():
        assert name in result.stdout
        assert spec.paper.split()[0] in result.stdout


def test_methods_show_uses_the_registry_description():
    name = next(iter(registry.REGISTRY))
    result = runner.invoke(app, ["methods", "show", name], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    for param in registry.describe(name):
        assert param.name in result.stdout


def test_config_rejects_unknown_method_parameter(tmp_path):
    name = next(iter(registry.REGISTRY))
    data = base_config(tmp_path)
    data["methods"] = [{"name": name, "weight": 1.0, "no_such_parameter_xyz": 1}]
    with pytest.raises(ConfigError) as info:
        load(tmp_path, data)
    assert info.value.field == "methods.0"
    assert str(info.value).startswith(f"methods.0 ({name}): ")
    assert "no_such_parameter_xyz" in str(info.value)


@pytest.mark.parametrize("name", list(registry.REGISTRY))
def test_config_validation_of_every_method_accepts_or_explains(tmp_path, name):
    """Each registered method, with its defaults, on the small test models: accepted, or refused
    with a ConfigError that names the method entry (never another exception). Which methods are
    refused here (e.g. MobileBERT needs equal widths) is tested with the methods themselves."""
    data = base_config(tmp_path)
    data["methods"] = [{"name": name}]
    try:
        cfg = load(tmp_path, data)
    except ConfigError as err:
        assert err.field == "methods.0" and str(err).startswith(f"methods.0 ({name}): ")
    else:
        assert [m.name for m in cfg.methods] == [name]
