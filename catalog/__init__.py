"""The product catalogue and the model that defines its vector space.

``catalog`` never imports ``consumer``: a catalogue is built and matched against with exactly
the same preprocessing and backbone code.
"""
