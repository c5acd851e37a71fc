"""The embedded end-to-end runs (``qlip demo``): they drive training and evaluation, so they sit
above both layers. ``qlip.demo.qlip`` is the QLIP demo (docs/demo.md); the downstream demos
(``qlip demo t2i|vlm|um3``) join it here."""
