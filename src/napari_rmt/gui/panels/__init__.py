"""The widget's panels: each owns its controls and talks to the others through ``AppState``."""
