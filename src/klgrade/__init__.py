"""klgrade: Kellgren-Lawrence grading of knee radiographs."""
__version__ = "0.1.0"
