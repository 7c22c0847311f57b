"""The pipeline made visible: one image stage by stage (``trace``), models side by side
(``compare``)."""
