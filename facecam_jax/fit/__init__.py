"""Does it fit? The real programs compiled ahead of time for a named target (``programs``);
their report (memory, FLOPs, verdict) is ``perf.report``."""
