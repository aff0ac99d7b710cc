"""ComfyUI node classes of the pack (thin adapters over k5core)."""
NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
