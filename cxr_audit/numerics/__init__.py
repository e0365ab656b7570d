"""Numerics shared by several stages (below them in the import order, so imports follow the
pipeline): concept activation vectors (:mod:`.cav`), thresholds (:mod:`.threshold`), tensor-layout
helpers (:mod:`.tensors`)."""
