"""Parameter-efficient adaptation methods, one module each (see ../shared/methods/adapt.md)."""
