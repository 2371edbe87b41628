from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest

from passforge.passes import registry
from passforge.passes.base import Context, Pass, PassResult


@dataclass(frozen=True)
class ThirdPartyPass(Pass):
    """A pass shipped by another package, found through the ``passforge.passes`` entry-point group."""

    name: ClassVar[str] = "third-party"

    def run(self, gm, ctx: Context) -> PassResult:
        return PassResult(gm, modified=False)


class _EntryPoint:
    name = "third-party"

    def load(self) -> type:
        return ThirdPartyPass


def test_entry_point_passes_are_discovered(monkeypatch):
    seen_groups = []

    def fake_entry_points(*, group: str):
        seen_groups.append(group)
        return [_EntryPoint()]

    registry.available()
    monkeypatch.setattr(registry, "entry_points", fake_entry_points)
    monkeypatch.setattr(registry, "_loaded", False)
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    assert registry.lookup("third-party") is ThirdPartyPass
    assert seen_groups == ["passforge.passes"]
    assert {"cleanup", "cast", "third-party"} <= set(registry.available())


def test_register_rejects_what_is_not_a_named_pass(monkeypatch):
    registry.available()  # built-ins registered before the registry is swapped for a scratch copy
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    with pytest.raises(TypeError, match="expects a Pass subclass"):
        registry.register(int)  # type: ignore[arg-type]

    @dataclass(frozen=True)
    class Nameless(Pass):
        def run(self, gm, ctx):
            return PassResult(gm, modified=False)

    with pytest.raises(TypeError, match="needs a class attribute `name"):
        registry.register(Nameless)

    @dataclass(frozen=True)
    class Impostor(Pass):
        name: ClassVar[str] = "cleanup"

        def run(self, gm, ctx):
            return PassResult(gm, modified=False)

    with pytest.raises(ValueError, match="pass name 'cleanup' is taken"):
        registry.register(Impostor)
