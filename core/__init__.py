"""The bottom layer: what every layer shares and the device needs.

Errors, atomic files and hashes, channel specs and SNR keys, frame constants,
long-form segmenting, the package layout and the version. Imports nothing of
ours and no torch (stdlib and numpy only); import-linter holds it to that.
"""
