"""What every command line shares: configs (files, checks), one-line errors, the paths a run
reads and writes, the compile cache and progress bars. Imports no model code."""
