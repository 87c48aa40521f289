"""The napari face of the plugin: manifest targets, layer conversion, widgets.

Everything here is a thin layer over ``napari_rmt.data`` (and later the trainer):
it converts between napari layers and the core's tiles and boxes, never the reverse.
"""
