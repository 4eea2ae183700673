"""The names this plugin registers, apart from the code behind them (which imports torch)."""

KERNEL = "rms_norm"
COLLECTIVE = "halving_doubling"
