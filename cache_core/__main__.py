"""`python -m cache_core`: what this engine knows: model families, registered policies, the feature schema."""

from cache_core.features import SCHEMA_ID, schema_table
from cache_core.models import FAMILIES
from cache_core.registry import policy_registry


def main() -> None:
    print("Model families:", ", ".join(f"{name} (config.json model_type {cls.model_type or name!r}"
                                       + (" with MoE keys)" if name == "llada_moe" else ")")
                                       for name, cls in sorted(FAMILIES.items())))
    print("Policies:", ", ".join(f"{name}({cls.knob})" if cls.knob else name
                                 for name, cls in policy_registry().items()), "+ exported learned policy files")
    print(f"Schema id: {SCHEMA_ID}\n")
    print(schema_table())


if __name__ == "__main__":
    main()
