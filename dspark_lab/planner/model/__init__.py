"""The planner's cost model, one concern per module: ``config`` (inputs, validated), ``flops`` (parameters and
per-operator FLOPs), ``memory`` (Korthikanti et al. 2022 terms), ``comm`` (collective costs), ``efficiency``
(achieved fraction of peak)."""
