"""Flow matching: the training schedule and loss (``flow``), the ODE solvers that sample it
(``solvers``), the MagCache step cache and the windows of a long video. Model-agnostic."""
