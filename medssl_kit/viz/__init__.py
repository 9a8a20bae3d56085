"""Visualisation: slice viewer, CAM overlays and plots."""
