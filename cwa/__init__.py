"""cwa — Critical Weight Analysis.

Find the individual weights of a causal language model that matter most, and prove it:
score every weight with a sensitivity metric, rank the top-K, perturb them against
random-K and bottom-K controls, check stability across seeds, and plot the results.

The library never imports typer; `cwa.cli` is the command-line front end.
"""

__version__ = "0.1.0"
