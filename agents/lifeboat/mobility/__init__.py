"""Mobility agent: change tracking, cycles and the batch sender on each protected machine."""
