"""Built-in strategies, one per module; each registers itself with ``@register_strategy``."""
