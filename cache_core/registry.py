"""The policy registry: every policy by name, and `make_policy`, which builds one from a name or a policy file.

A policy class joins the registry with the `@register_policy` decorator; the built-in ones are in
`cache_core.heuristics` and `cache_core.oracle`, imported here on first use. So a new heuristic is one class.
"""

from __future__ import annotations

from typing import Any

from cache_core.policy import ReusePolicy

_REGISTRY: dict[str, type[ReusePolicy]] = {}


def register_policy(cls: type[ReusePolicy]) -> type[ReusePolicy]:
    """Class decorator: make `cls` buildable as `make_policy(cls.name, **knobs)`."""
    if not (isinstance(cls, type) and issubclass(cls, ReusePolicy)):
        raise TypeError(f"register_policy takes a ReusePolicy subclass, got {cls!r}")
    other = _REGISTRY.get(cls.name)
    if other is not None and other is not cls:
        raise ValueError(f"policy name {cls.name!r} is taken by {other.__module__}.{other.__qualname__}")
    _REGISTRY[cls.name] = cls
    return cls


def policy_registry(modality: str | None = None) -> dict[str, type[ReusePolicy]]:
    """Name -> class of every registered policy (the oracle last); with `modality` ("text" or "image") only the
    policies that run on that family's cache (`ReusePolicy.modalities`)."""
    from cache_core import heuristics, oracle  # noqa: F401  (their classes register on import)
    from cache_core.image import heuristics as image_heuristics  # noqa: F401

    chosen = {n: c for n, c in _REGISTRY.items() if modality is None or modality in c.modalities}
    return dict(sorted(chosen.items(), key=lambda kv: kv[0] == "oracle"))


def check_policy_name(key: str, name: str, files: bool = True) -> str:
    """A config value that names a policy: a registered name (or, with files, an exported .onnx/.json path)."""
    if name in policy_registry() or (files and str(name).endswith((".onnx", ".json"))):
        return name
    more = " or the path of an exported policy (.onnx)" if files else ""
    raise ValueError(f"{key}={name!r} is not a policy; choose one of {sorted(policy_registry())}{more}")


def make_policy(name: str | ReusePolicy | None, **knobs: Any) -> ReusePolicy:
    """Build a policy by registry name (`full`, `dual_cache`, ...) or from the path of an exported learned policy."""
    if isinstance(name, ReusePolicy):
        if knobs:
            raise ValueError("knobs were given for an already built policy; pass a name instead")
        return name
    if name is None:
        name = "full"
    registry = policy_registry()
    if name in registry:
        try:
            return registry[name](**knobs)
        except TypeError as err:
            raise ValueError(f"bad knobs {knobs} for policy {name!r}: {err}") from err
    if str(name).endswith(".onnx") or str(name).endswith(".json"):
        from cache_core.learned import load_policy

        return load_policy(name, **knobs)
    if "/" in str(name) or "." in str(name):  # looks like a file: say which file was not found
        raise ValueError(f"unknown policy {name!r}: not a registry name, and not an exported policy file (those end "
                         f"in .onnx, with a .json manifest beside them); registry names: {sorted(registry)}")
    raise ValueError(f"unknown policy {name!r}; choose one of {sorted(registry)} or a path to an exported policy")
