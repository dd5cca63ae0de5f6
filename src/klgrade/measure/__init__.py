"""Quantitative measurements on knee radiographs: minimum joint space width per compartment."""
from klgrade.measure.jsw import JSW, Compartment, measure_knee

__all__ = ["JSW", "Compartment", "measure_knee"]
