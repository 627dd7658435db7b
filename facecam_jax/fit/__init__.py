"""Does it fit? The real programs compiled ahead of time for a named target (``programs``)
and the report of their memory, FLOPs and verdict (``report``)."""
