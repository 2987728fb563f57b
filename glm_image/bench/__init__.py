"""The benchmark harness (`glm-image bench`): speed against the reference, text-rendering quality.

``report`` (the JSON layout every benchmark writes, Markdown tables), ``roofline`` (the hardware
floor: device table, weight bytes per AR token, DiT FLOPs per step), ``memory`` (peak memory of a
run), ``engines`` (ours and diffusers' pipeline behind one timed interface), ``speed``,
``metrics`` (CVTG-2K and LongText-Bench scores), ``ocr``, ``suites``, ``quality``, ``plot``.
Importing this package loads no model, OCR or plotting library.
"""
