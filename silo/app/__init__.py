"""The top layer: the `silo` command (`cli`) and the demo (`demo`). Nothing below imports it."""
