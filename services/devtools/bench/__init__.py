"""`make bench`: the system's figures measured next to a bare baseline in the same run."""
