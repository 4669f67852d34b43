"""`python -m cache_core`: what this engine knows: model families, registered policies per modality, the feature
schemas (one per family)."""

from cache_core.features import SCHEMAS
from cache_core.models import FAMILIES
from cache_core.registry import policy_registry


def main() -> None:
    import cache_core.image  # noqa: F401  (registers the image schema)

    print("Model families:", ", ".join(f"{name} (config.json model_type {cls.model_type or name!r}"
                                       + (" with MoE keys)" if name == "llada_moe" else ")")
                                       for name, cls in sorted(FAMILIES.items())))
    registry = policy_registry()
    for modality in ("text", "image"):
        names = [f"{name}({cls.knob})" if cls.knob else name for name, cls in registry.items()
                 if modality in cls.modalities]
        print(f"Policies ({modality}):", ", ".join(names), "+ exported learned policy files of its schema")
    for schema in SCHEMAS.values():
        print(f"\nSchema id ({schema.family} family): {schema.id}\n")
        print(schema.table())


if __name__ == "__main__":
    main()
