"""One-step SR methods behind one interface (``Method``), built from the ``method`` config group."""
