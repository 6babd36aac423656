"""oprd: on-policy (representation) distillation with cached teacher activations."""

__version__ = "0.1.0"
