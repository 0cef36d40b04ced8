"""The drafter adapter: its metadata (meta), attaching and switching it (attach), the merged and gated LoRA layers
the runtime decodes with (layers, twins), and saving and installing it (saving)."""
