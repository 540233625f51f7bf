"""`dpa bench`: side-by-side measurements, printed as ratios and as --json."""
