"""Entry-point registry: built-ins load, bad plugins are skipped, duplicates name their source."""

from __future__ import annotations

import logging
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from monitor.measures import MeasurePlugin, PluginError, PluginRegistry, load_plugins
from plugins.entropy import EntropyPlugin

GROUP = "apmon.test_plugins"


@pytest.fixture()
def fake_distribution(tmp_path: Path) -> Iterator[Path]:
    """A real installed-distribution layout on sys.path whose entry points the test writes."""
    sys.path.insert(0, str(tmp_path))
    yield tmp_path
    sys.path.remove(str(tmp_path))
    for name in [m for m in sys.modules if m.startswith("apmon_fake_")]:
        del sys.modules[name]


def _install(root: Path, dist: str, entry_points: str, module_source: str) -> None:
    info = root / f"{dist}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[{GROUP}]\n{entry_points}\n")
    (root / f"{dist}.py").write_text(textwrap.dedent(module_source))


PLUGIN_SOURCE = """
from monitor.measures import PluginResult

class Plugin:
    name = "{name}"
    version = "2.0"
    requires = ()
    def process(self, event, context, state, upstream):
        return PluginResult()
"""


def test_builtin_entropy_plugin_loads_from_entry_points() -> None:
    registry = load_plugins()
    assert "entropy" in registry
    assert registry.get("entropy").version == EntropyPlugin.version


def test_failing_plugin_is_skipped_with_a_warning(
    fake_distribution: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _install(
        fake_distribution,
        "apmon_fake_ok",
        "good = apmon_fake_ok:Plugin",
        PLUGIN_SOURCE.format(name="good"),
    )
    _install(
        fake_distribution,
        "apmon_fake_broken",
        "broken = apmon_fake_broken:Plugin",
        "raise ImportError('no such dependency')\n",
    )
    with caplog.at_level(logging.WARNING):
        registry = load_plugins(GROUP)
    assert "good" in registry and len(registry) == 1
    assert "broken" in caplog.text and "apmon_fake_broken:Plugin" in caplog.text


def test_duplicate_names_are_rejected_naming_the_entry_point(fake_distribution: Path) -> None:
    _install(
        fake_distribution,
        "apmon_fake_a",
        "first = apmon_fake_a:Plugin",
        PLUGIN_SOURCE.format(name="same"),
    )
    _install(
        fake_distribution,
        "apmon_fake_b",
        "second = apmon_fake_b:Plugin",
        PLUGIN_SOURCE.format(name="same"),
    )
    with pytest.raises(PluginError) as caught:
        load_plugins(GROUP)
    assert "'same'" in str(caught.value) and "apmon_fake_b:Plugin" in str(caught.value)


class _Named:
    version = "1"

    def __init__(self, name: str, requires: tuple[str, ...] = ()) -> None:
        self.name = name
        self.requires = requires

    def process(self, event, context, state, upstream):  # type: ignore[no-untyped-def]
        raise NotImplementedError


def test_plugins_come_after_what_they_require() -> None:
    registry = PluginRegistry([_Named("z"), _Named("a", ("z",)), _Named("m", ("a",))])
    assert [p.name for p in registry.ordered()] == ["z", "a", "m"]


def test_missing_and_cyclic_requirements_are_errors() -> None:
    with pytest.raises(PluginError, match="requires 'nope'"):
        PluginRegistry([_Named("a", ("nope",))]).ordered()
    with pytest.raises(PluginError, match="cycle"):
        PluginRegistry([_Named("a", ("b",)), _Named("b", ("a",))]).ordered()


def test_objects_that_do_not_implement_the_contract_are_refused() -> None:
    with pytest.raises(PluginError, match="does not implement"):
        PluginRegistry().add(object(), origin="somewhere")  # type: ignore[arg-type]
    assert isinstance(EntropyPlugin(), MeasurePlugin)
